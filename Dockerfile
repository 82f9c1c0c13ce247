# One image for every role: `docker run pairdb --role=storage ...`.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY src ./src
COPY migrations ./migrations
RUN cargo build --release --locked --bin pairdb

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/pairdb --create-home pairdb
COPY --from=build /src/target/release/pairdb /usr/local/bin/pairdb
COPY config /etc/pairdb
USER pairdb
WORKDIR /var/lib/pairdb
# storage gRPC, coordinator gRPC, gateway HTTP, their health/metrics ports, gossip
EXPOSE 7101 7201 8080 8101 8201 7301/udp
ENTRYPOINT ["pairdb"]
CMD ["--help"]
