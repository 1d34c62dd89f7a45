//! The C memory functions rustc's code calls. There is no libc here; `rep movsb`/`rep stosb` (fast on any
//! recent CPU) in asm so the compiler cannot turn an open-coded loop back into a call to itself.

use core::arch::asm;

/// # Safety
/// C `memcpy` contract.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    asm!("rep movsb", inout("rcx") n => _, inout("rdi") dest => _, inout("rsi") src => _,
        options(nostack, preserves_flags));
    dest
}

/// # Safety
/// C `memmove` contract.
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize).wrapping_sub(src as usize) >= n {
        // dest is below src or past its end: a forward copy never overwrites unread bytes.
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dest => _, inout("rsi") src => _,
            options(nostack, preserves_flags));
    } else if n > 0 {
        asm!("std", "rep movsb", "cld", inout("rcx") n => _, inout("rdi") dest.add(n - 1) => _,
            inout("rsi") src.add(n - 1) => _, options(nostack));
    }
    dest
}

/// # Safety
/// C `memset` contract.
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    asm!("rep stosb", inout("rcx") n => _, inout("rdi") dest => _, in("al") c as u8,
        options(nostack, preserves_flags));
    dest
}

/// # Safety
/// C `memcmp` contract.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // Volatile reads keep LLVM from recognising this loop as memcmp/bcmp.
        let (x, y) = (a.add(i).read_volatile(), b.add(i).read_volatile());
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// LLVM calls `bcmp` for memcmp results only compared with zero.
///
/// # Safety
/// C `bcmp` contract.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    memcmp(a, b, n)
}
