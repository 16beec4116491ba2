//! mesh's kernel programs. Each attach point has its own module with a thin
//! entry point; shared logic lives in small library modules.
#![no_std]
#![no_main]

mod backend;
mod connect4;
mod getpeername4;
mod maps;
mod sock_addr;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach a panic, so this is
    // never executed; it only satisfies `no_std`.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
