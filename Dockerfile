# Winslow's image: `winslow node` and `winslow viewer` (and every other verb) in a container.
#
#   docker build -t winslow .                     # BASE: an official Python image, packages from the internet
#   docker build -t winslow/winslow:ci --build-arg BASE=winslow-demo/python:3 --build-arg OFFLINE=1 .
#
# Offline (CI, no index or Debian mirror reachable from the build): BASE must already hold
# python3 with venv, git and the docker client, and .whl/ in the build context must hold
# wheels of every dependency and of the build backend, for BASE's Python:
#
#   .venv/bin/python -m pip wheel -q --wheel-dir .whl . hatchling && rm -f .whl/winslow-*.whl
#
# A node in this image drives the host's engine through the mounted /var/run/docker.sock
# (the Docker SDK for the stages, the docker client for its watchdog). README.md: "Winslow's image".
# Written for the classic builder and BuildKit alike: no `# syntax`, no RUN --mount.

ARG BASE=python:3.11-slim

FROM ${BASE} AS install
# Names the classic builder's leftover of this stage, so that .ci/run can remove it.
LABEL winslow.stage=install
ARG OFFLINE=
COPY . /src
# A virtualenv, not the system's site-packages: Debian's python3 refuses `pip install` there (PEP 668).
RUN python3 -m venv /opt/winslow \
 && if [ -n "$OFFLINE" ]; then index="--no-index"; else index=""; fi \
 && /opt/winslow/bin/python -m pip install --no-cache-dir --disable-pip-version-check -q $index \
        --find-links /src/.whl /src \
 && /opt/winslow/bin/winslow --help >/dev/null

FROM ${BASE}
ARG OFFLINE=
# git for the state repo; the docker client for the node's watchdog (`docker ps`, `docker stop`).
# A base that has both (the CI base) needs no package index; Debian 13 splits the client off as
# docker-cli, Debian 12 only has it inside docker.io.
RUN if command -v git >/dev/null && command -v docker >/dev/null; then exit 0; fi \
 && if [ -n "$OFFLINE" ]; then echo "OFFLINE build: BASE lacks git or the docker client" >&2; exit 1; fi \
 && apt-get update -q \
 && if apt-cache show docker-cli >/dev/null 2>&1; then client=docker-cli; else client=docker.io; fi \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends git ca-certificates "$client" \
 && rm -rf /var/lib/apt/lists/*
# The state repo, its remote and the storage are mounted in from the host and owned by
# whoever owns them there: git's ownership check would refuse every one of them.
RUN git config --system --add safe.directory '*'
COPY --from=install /opt/winslow /opt/winslow
# The node's own folder (repo mirror, journal, lease) defaults to $XDG_STATE_HOME/winslow/NAME:
# mount /var/lib/winslow to keep it across containers.
ENV PATH=/opt/winslow/bin:$PATH \
    XDG_STATE_HOME=/var/lib \
    PYTHONUNBUFFERED=1
ENTRYPOINT ["winslow"]
CMD ["--help"]
