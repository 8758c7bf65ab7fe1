//! `bench_server` with a counting global allocator: its `REPORT` lines (on `SIGUSR1`) give the live heap
//! in bytes and allocations, for `benches/run`'s idle-connection part. A build of its own so that the plain
//! `bench_server`, whose instructions per request `benches/instructions` counts, pays nothing for
//! counting. Same flags as `bench_server`.

#[path = "bench_server.rs"]
mod server;

#[global_allocator]
static ALLOC: server::Counting = server::Counting;

fn main() -> std::io::Result<()> {
    server::main()
}
