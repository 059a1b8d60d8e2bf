//! The `yizhan` binary: the command line of [`yizhan::cli`] with the built-in channel kinds.

fn main() {
    yizhan::cli::main_with(yizhan::channels::ChannelKinds::builtin())
}
