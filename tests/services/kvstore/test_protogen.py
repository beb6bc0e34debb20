from proto.generate import stale_stubs


def test_committed_stubs_match_a_fresh_generation() -> None:
    assert stale_stubs() == []


def test_generated_modules_import_package_relative() -> None:
    from proto.baton.v1 import kvstore_pb2, kvstore_pb2_grpc

    assert kvstore_pb2.DESCRIPTOR.package == "baton.v1"
    assert kvstore_pb2_grpc.KVStoreStub.__module__ == "proto.baton.v1.kvstore_pb2_grpc"
