# Flushline: a slim, non-root image. Cloud Run sets $PORT; the service honours it.
FROM python:3.11-slim AS build
WORKDIR /src
COPY setup.py pyproject.toml README.md ./
COPY app ./app
COPY strategies ./strategies
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FLUSHLINE_LOG_FORMAT=json
RUN useradd --system --uid 10001 --no-create-home flushline
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER flushline
EXPOSE 8080
CMD ["flushline", "serve"]
