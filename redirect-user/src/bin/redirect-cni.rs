//! `redirect-cni`: the chained CNI plugin (see `redirect_user::cni::plugin`).

fn main() -> std::process::ExitCode {
    redirect_user::cni::plugin::main()
}
