# The tq-mooncake image: the `tq-mooncake` command (workload, dashboard, storage-node) and `mooncake_master`.
#   docker build -t tq-mooncake:0.1.0 .      (docker-compose.yml builds it for the cluster recipe)
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The Mooncake wheels link against the RDMA user-space libraries even when only TCP is used.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libibverbs1 librdmacm1 \
    && rm -rf /var/lib/apt/lists/*

# torch first and pinned, from the CPU index: a bare `torch` would pull a multi-GB CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /src
COPY pyproject.toml README.md ./
# The build command that writes tq_mooncake-autoload.pth (pyproject.toml [tool.setuptools.cmdclass]).
COPY scripts/build_pth.py ./scripts/build_pth.py
COPY client ./client
COPY telemetry ./telemetry
COPY transferqueue ./transferqueue
COPY cluster ./cluster
COPY cli ./cli
COPY dashboard ./dashboard
COPY testing ./testing
COPY autoload ./autoload
RUN pip install ".[cpu,telemetry,dashboard]" torch==2.13.0 \
    && rm -rf /src/build /src/*.egg-info

# Non-root. uid 10001 is also the OpenTelemetry Collector image's user: both can use the shared telemetry volume.
RUN useradd --create-home --uid 10001 --user-group tq \
    && mkdir -p /telemetry \
    && chown tq:tq /telemetry
USER 10001:10001
WORKDIR /home/tq

ENTRYPOINT ["tq-mooncake"]
CMD ["--help"]
