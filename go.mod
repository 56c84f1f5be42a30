module sidecar

go 1.25.0

require github.com/coder/websocket v1.8.15

require (
	golang.org/x/crypto v0.55.0
	golang.org/x/net v0.57.0 // indirect
	golang.org/x/text v0.41.0 // indirect
)
