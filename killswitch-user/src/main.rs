fn main() -> std::process::ExitCode {
    killswitch::cli::main()
}
