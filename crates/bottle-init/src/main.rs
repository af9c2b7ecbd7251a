//! bottle-init: PID 1 of the bot-bottle guest (see `bottle_init::pid1`).

fn main() {
    bottle_init::pid1::pid1_main()
}
