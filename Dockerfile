# Container image of the sidecar: the static binary, CA certificates
# (for ACME and TLS to backends) and nothing else. Docker, Podman and
# Buildah read this file. Two ways to build it:
#
#   docker build -t sidecar .
#     compiles the binary in a Go build stage (the default, SOURCE=source).
#     Use it wherever the golang image can be pulled: CI with a registry,
#     a workstation. The image then reports version "(devel)": .git stays
#     out of the build context (.dockerignore).
#
#   bash scripts/build-image.sh
#     builds the binary outside with the local Go toolchain and packs it
#     (SOURCE=local, the binary and ca-certificates.crt in the build
#     context), then checks the image. Use it where no Go base image can be
#     pulled (this repository's CI) or to ship exactly the binary you tested;
#     `sidecar version` then names the commit when built from a git clone.
#     By hand:
#       CGO_ENABLED=0 go build -trimpath -ldflags=-s -o ctx/sidecar .
#       cp /etc/ssl/certs/ca-certificates.crt ctx/
#       buildah build --build-arg SOURCE=local -f Dockerfile -t sidecar ctx
#
# The stage not selected by SOURCE is skipped (BuildKit, Buildah 1.24+).

ARG SOURCE=source
ARG GO_VERSION=1.25

FROM golang:${GO_VERSION} AS build-source
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -ldflags=-s -o /out/sidecar . \
	&& cp /etc/ssl/certs/ca-certificates.crt /out/

FROM scratch AS build-local
COPY sidecar ca-certificates.crt /out/

FROM build-${SOURCE} AS build

FROM scratch
COPY --from=build /out/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /out/sidecar /sidecar
# nobody: no /etc/passwd in the image, hence numbers, and the group too
# (a user without one runs in group 0).
USER 65534:65534
# Every interface: the kubelet's probe and the other containers reach it.
# Set MICRO_AUTH_TOKEN_FILE (or --auth_token_file) to require a token.
ENV MICRO_ADDRESS=:8081
EXPOSE 8081
ENTRYPOINT ["/sidecar"]
