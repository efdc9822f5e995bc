"""Packaging for Flushline: live job progress over SSE through buffering proxies."""

from setuptools import find_packages, setup

setup(
    name="flushline",
    version="0.1.0",
    description="Stream the live progress of long jobs to browsers over SSE, through any proxy.",
    python_requires=">=3.11",
    # The Python client ships with the service from its own distribution's folder
    # (clients/python, `pip install ./clients/python` for the client alone): one copy of
    # the code, which app.client re-exports for the service's own use.
    packages=[
        *find_packages(include=["app", "app.*", "strategies", "strategies.*"]),
        "flushline_client",
    ],
    package_dir={"flushline_client": "clients/python/flushline_client"},
    package_data={
        "app": ["py.typed", "web/static/*"],
        "strategies": ["py.typed"],
        "flushline_client": ["py.typed"],
    },
    install_requires=[
        "aiohttp>=3.9",
        "attrs>=23.1",
        "orjson>=3.9",
        # /metrics: the reference Prometheus client (text format, histograms, registries).
        "prometheus-client>=0.20",
        # FLUSHLINE_BUS=redis: the official client, asyncio API, pooling, RESP3.
        "redis>=5",
        "structlog>=24.1",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-aiohttp>=1.1",
            "pytest-asyncio>=0.23",
            "hypothesis>=6.100",
            # Drives the system Chromium for the browser tests (no browser download).
            "playwright>=1.40",
            # Parses the Cloud Run manifest the deploy tests check (a real YAML parser).
            "pyyaml>=6",
            "packaging>=23",
            # Fuzzes the live server from its own /openapi.json (5xx and schema violations).
            "schemathesis>=4",
            # The fan-out benchmark's anchor, which the suite smoke-runs at tiny scale.
            "aiohttp-sse>=2.2",
        ],
        "bench": [
            # The fan-out benchmark's anchor: a plain aiohttp + aiohttp-sse server.
            "aiohttp-sse>=2.2",
            # Profiles the server under the benchmark's load (sampling, no code change).
            "py-spy>=0.3",
        ],
        "examples": [
            # examples/fastapi_app: a FastAPI backend that publishes its agent's progress.
            "fastapi>=0.110",
            "uvicorn>=0.29",
        ],
        "docs": [
            # The manual in docs/: built (and link-checked) with mkdocs build --strict.
            "mkdocs>=1.6",
        ],
        "dev": [
            "mypy>=1.10",
            "ruff>=0.5",
        ],
    },
    entry_points={"console_scripts": ["flushline=app.cli:main"]},
)
