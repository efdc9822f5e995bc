# Flushline: a slim, non-root image with pinned dependencies. Cloud Run sets $PORT; the
# service honours it (8080 otherwise). Build: docker build -t flushline .
#
# Three stages, so that the final image gets two layers of its own: the dependencies
# (rebuilt only when requirements/constraints.txt changes) and the app (a code change
# rebuilds this one alone). No wheel or pip cache lands in any layer: pip installs straight
# into the target directories with --no-cache-dir, and only those directories are copied.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# 1. Dependencies: the pinned versions and nothing else (--no-deps: a dependency missing
#    from the file fails `pip check` below rather than being resolved unpinned), binary
#    wheels only (slim has no compiler), into an empty venv (no pip or setuptools inside:
#    nothing at run time needs them).
FROM ${PYTHON_IMAGE} AS deps
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv --without-pip /opt/venv
COPY requirements/constraints.txt /tmp/constraints.txt
RUN pip --python /opt/venv/bin/python install --no-cache-dir --no-deps --only-binary=:all: \
        -r /tmp/constraints.txt

# 2. The app, installed without dependencies into a prefix of its own, which the final
#    stage lays over the venv. `pip check` proves the pins hold everything the app needs,
#    and everything they need in turn.
FROM deps AS app
WORKDIR /src
COPY setup.py pyproject.toml ./
COPY app ./app
COPY strategies ./strategies
COPY clients/python/flushline_client ./clients/python/flushline_client
RUN pip --python /opt/venv/bin/python install --no-cache-dir --no-deps --prefix=/install . \
    && PYTHONPATH=/install/lib/python3.11/site-packages pip --python /opt/venv/bin/python check

# 3. The image: the dependency venv, the app over it, a non-root user.
#    A container is reached from outside it, so the service listens on every address
#    (FLUSHLINE_HOST=0.0.0.0), and refuses to start there unless it is told how to guard
#    the API: FLUSHLINE_API_TOKEN (production: Secret Manager on Cloud Run, see
#    config/cloudrun/service.yaml), or FLUSHLINE_AUTH=off for a private demo, e.g.
#    docker run -p 127.0.0.1:8080:8080 -e FLUSHLINE_AUTH=off flushline
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FLUSHLINE_HOST=0.0.0.0 \
    FLUSHLINE_LOG_FORMAT=json
RUN groupadd --system --gid 10001 flushline \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin flushline
COPY --from=deps /opt/venv /opt/venv
COPY --from=app /install/ /opt/venv/
USER 10001:10001
EXPOSE 8080
# Docker's own check (Cloud Run ignores it and uses the probes in config/cloudrun/service.yaml).
# The port as the service picks it: PORT, then FLUSHLINE_PORT, then 8080.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('PORT') or os.environ.get('FLUSHLINE_PORT') or '8080'; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"]
CMD ["flushline", "serve"]
