# syntax=docker/dockerfile:1
# Build: docker build -t verigate .
# Run:   docker run -p 8080:8080 -v verigate-data:/data \
#          -e VERIGATE_APP_KEY=... -e VERIGATE_APP_SECRET=... -e VERIGATE__API__TOKEN=... verigate

FROM rust:1-slim-bookworm AS chef
RUN cargo install --locked cargo-chef
WORKDIR /app

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /app/recipe.json recipe.json
# Dependencies are built in their own layer, reused until Cargo.lock changes.
RUN cargo chef cook --release --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked --bin verigate

FROM debian:bookworm-slim AS runtime
LABEL org.opencontainers.image.title="verigate" \
      org.opencontainers.image.description="Receiver for Sinch Verification callbacks"
RUN useradd --system --uid 10001 --home-dir /data verigate \
    && mkdir -p /data /etc/verigate \
    && chown verigate /data
COPY --from=builder --chown=root:root --chmod=755 /app/target/release/verigate /usr/local/bin/verigate
COPY --chown=root:root config/policy.toml config/policy.schema.json /etc/verigate/
COPY --chown=root:root config/lists /etc/verigate/lists
ENV VERIGATE__SERVER__LISTEN=0.0.0.0:8080 \
    VERIGATE__STORE__PATH=/data/verigate.sled \
    VERIGATE__POLICY__PATH=/etc/verigate/policy.toml \
    VERIGATE__LOG__FORMAT=json
USER verigate
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/verigate", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/verigate"]
CMD ["serve"]
