fn main() -> std::process::ExitCode {
    mesh_agent::cli::main()
}
