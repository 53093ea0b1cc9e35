# syntax=docker/dockerfile:1
# herald container image: a release build on the official Rust image, run as
# a non-root user on debian:bookworm-slim.
#
#   docker build -t herald .
#   docker run --rm -p 3000:3000 \
#     -e HERALD_JWT_SECRET=… -e HERALD_PUBLISH_TOKEN=… -v herald-data:/data herald
#
# The image defaults to HERALD_ENV=production: it refuses to start without the
# two secrets (set HERALD_ENV=development to try it with throwaway ones).
# deploy/compose.yaml runs two instances behind nginx with Redis.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
WORKDIR /src
# Everything the build reads (see .dockerignore for what stays out). sqlx's
# migrate! macro embeds migrations/ at compile time; no database is needed.
COPY . .
# The registry and target directories are BuildKit cache mounts, so a rebuild
# after a source change recompiles herald only; the binary is copied out of the
# cache in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin herald \
 && install -D -m 0755 target/release/herald /out/herald

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# No extra packages: the binary links only glibc (SQLite is bundled; TLS, used
# only to fetch a JWKS, is rustls with built-in roots, so no ca-certificates),
# and the health check below needs nothing but bash.
RUN groupadd --system --gid 10001 herald \
 && useradd --system --uid 10001 --gid herald --home-dir /data --no-create-home --shell /usr/sbin/nologin herald \
 && mkdir -p /data \
 && chown herald:herald /data
COPY --from=build /out/herald /usr/local/bin/herald

ENV HERALD_ENV=production \
    HERALD_LISTEN=0.0.0.0:3000 \
    HERALD_DATABASE_URL=sqlite:///data/herald.db
# The SQLite file (and its -wal / -shm companions) live here. Point
# HERALD_DATABASE_URL at PostgreSQL to use the application's own database.
VOLUME ["/data"]
WORKDIR /data
USER herald:herald
EXPOSE 3000

# Liveness without curl or wget: bash's /dev/tcp speaks HTTP/1.0 to /healthz on
# the port of HERALD_LISTEN and checks for a 200 status line.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["bash", "-c", "[[ $HERALD_LISTEN =~ [0-9]+$ ]] && exec 3<>/dev/tcp/127.0.0.1/$BASH_REMATCH && printf 'GET /healthz HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && IFS= read -r status <&3 && [[ $status == 'HTTP/1.'[01]' 200'* ]]"]

# herald handles SIGTERM itself (disconnects every socket, exits within
# HERALD_SHUTDOWN_GRACE, 10 s by default), also as PID 1. Give `docker stop`
# more time than that grace (`--time`, compose's stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/herald"]
