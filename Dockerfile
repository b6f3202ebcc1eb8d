# syntax=docker/dockerfile:1

# Exact tags: a rebuild gets the same toolchain and base (bump them on purpose).
# The builder and the runtime are both Debian 12 (bookworm), so the binary's
# glibc matches.

# ---- build -------------------------------------------------------------------
FROM rust:1.95.0-bookworm AS builder
WORKDIR /app
COPY . .
# The cache mounts keep the registry and target/ between builds; the binary is
# copied out because a cache mount is not part of the image. It is stripped
# here, not by the release profile, so a local `cargo build --release` keeps
# its line tables for profiling.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/app/target \
    cargo build --release --locked \
 && cp target/release/wallet /usr/local/bin/wallet \
 && strip /usr/local/bin/wallet

# ---- runtime -----------------------------------------------------------------
FROM debian:12.11-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent wallet \
 && mkdir -p /data \
 && chown wallet:wallet /data
COPY --from=builder /usr/local/bin/wallet /usr/local/bin/wallet

# Without DATABASE_URL the embedded SQLite file lives in /data/wallet.db.
ENV WALLET_DATA_DIR=/data \
    BIND_ADDR=0.0.0.0:3000
VOLUME ["/data"]
USER wallet
# 3000: the API (`serve`); `worker` and `relay` serve their probes on
# METRICS_BIND when it is set (docker-compose.yml uses 9100).
EXPOSE 3000
ENTRYPOINT ["/usr/local/bin/wallet"]
CMD ["serve"]
