# The client of the docker-compose lab: curl and a UDP client, on the client network, routing the
# VIPs through the top-of-rack router.
#   docker build -f deploy/compose/client.Dockerfile -t kube2ipvs-lab-client .
FROM debian:bookworm-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends curl iproute2 netcat-openbsd \
 && rm -rf /var/lib/apt/lists/*
