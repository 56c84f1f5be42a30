# Container image of the sidecar: the static binary, CA certificates (for
# ACME and TLS to backends) and nothing else. Docker, Podman and Buildah read
# this file. Two ways to build it:
#
#   docker build -t sidecar .        (or podman build, buildah build)
#     compiles the binary in a Go build stage (SOURCE=source, the default).
#     Use it wherever the golang image can be pulled. The binary reports
#     version "(devel)": .git stays out of the build context (.dockerignore).
#
#   bash scripts/build-image.sh
#     compiles with the local Go toolchain, packs that binary (SOURCE=local)
#     and checks the image. Use it where no Go base image can be pulled (this
#     repository's CI) or to ship the very binary you tested. By hand:
#       CGO_ENABLED=0 go build -trimpath -ldflags=-s -o ctx/sidecar .
#       cp /etc/ssl/certs/ca-certificates.crt ctx/
#       buildah build --build-arg SOURCE=local -f Dockerfile -t sidecar ctx
#
# Only the stage SOURCE names is built. Its default sits in the FROM line,
# ${SOURCE:-source}, not in the ARG: Buildah (1.28 at least) picks the stages
# to build before it applies an ARG's default, and would skip that stage.

ARG SOURCE=
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

FROM build-${SOURCE:-source} AS build

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
