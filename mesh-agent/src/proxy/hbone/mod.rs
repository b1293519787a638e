//! HBONE: HTTP/2 CONNECT tunnels over mutual TLS (being written).
