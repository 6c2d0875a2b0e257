//! Containerd import benchmark (being written).
fn main() {
    eprintln!("import benchmark: not built yet");
    std::process::exit(1);
}
