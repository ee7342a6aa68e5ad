# One image for every role: nsm registry | manager | forwarder | nse | nsc | cni-agent |
# cni-install | cni-uninstall | health. Build: docker build -t nsm:dev .
# The e2e stage adds what the kind suite's client pods use (ping, scapy):
#   docker build --target e2e -t nsm-e2e:dev .
# bookworm: the nsm-cni bundle carries its own glibc, but an older base keeps it small and safe.
ARG PYTHON=3.12

FROM python:${PYTHON}-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY nsm ./nsm
COPY deploy/image ./deploy/image
COPY cni/shim ./cni/shim
# The bundle: the Python plugin with its own interpreter, and the plugin's compiled fast path
# (static: it runs on the host), which nsm cni-install puts in front of it.
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends gcc libc6-dev \
 && pip install --no-cache-dir --root-user-action=ignore --prefix=/install . \
 && python deploy/image/cni_bundle.py /opt/nsm-cni \
 && cc -O2 -static -Wall -Wextra -Werror -o /opt/nsm-cni/shim cni/shim/nsm-cni.c

FROM python:${PYTHON}-slim-bookworm AS base
COPY --from=build /install /usr/local
COPY --from=build /opt/nsm-cni /opt/nsm-cni
# Roles that need no privileges (registry, endpoints, clients) run as this user; the node's
# roles (manager, forwarder, cni-agent, cni-install) run as root with the capabilities the
# DaemonSet grants.
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin nsm \
 && python -c "import nsm.cli, grpc, pyroute2, lightkube"
ENV PYTHONUNBUFFERED=1
USER 10001
ENTRYPOINT ["nsm"]
CMD ["--help"]

FROM base AS e2e
USER 0
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends iputils-ping iproute2 \
 && rm -rf /var/lib/apt/lists/* && pip install --no-cache-dir --root-user-action=ignore scapy==2.8.0
USER 10001

# The default target.
FROM base
