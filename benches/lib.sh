# Shared by the bench scripts (sourced, not run).

# server_addr FILE: the address a bench server printed as its first line (`listening on http[s]://ADDR`),
# waited for up to 30 s (a server under valgrind starts slowly); fails if it never came.
server_addr() {
  local addr=
  for _ in $(seq 300); do
    addr=$(sed -n 's#^listening on https\{0,1\}://##p' "$1" 2>/dev/null || true)
    if [ -n "$addr" ]; then
      echo "$addr"
      return 0
    fi
    sleep 0.1
  done
  return 1
}
