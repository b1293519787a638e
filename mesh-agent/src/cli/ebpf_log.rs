//! `mesh-agent ebpf-log on|off|status`: the programs' debug-log switch, through its pin.
use super::{EbpfLogArgs, EbpfLogSwitch};
use crate::datapath::log;

pub fn ebpf_log(args: &EbpfLogArgs) -> anyhow::Result<String> {
    match args.switch {
        EbpfLogSwitch::On => log::set_enabled(&args.pin_dir, true)?,
        EbpfLogSwitch::Off => log::set_enabled(&args.pin_dir, false)?,
        EbpfLogSwitch::Status => {}
    }
    let on = log::enabled(&args.pin_dir)?;
    Ok(format!(
        "eBPF debug log {} ({})\n",
        if on { "on" } else { "off" },
        args.pin_dir.display()
    ))
}
