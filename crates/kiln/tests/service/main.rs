//! The assembled service, through real HTTP on loopback: the `kiln` binary as a process (real
//! FLUX.1 engine on the engine's tiny test checkpoint, real SQLite file, real files), and the
//! in-process [`kiln::app::Application`] driven by the scripted test engine where a test needs
//! to control timing.

mod demo_quality;
mod harness;
mod in_process;
mod live;
mod many_machines;
mod playground;
mod processes;
