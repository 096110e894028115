//! Creating the KVM VM: guest memory, the image, the boot structures and the vCPU.

use super::VmError;
use crate::loader::{load_elf, LoadedImage};
use crate::memory::GuestMemoryMmap;
use crate::memory::{create_guest_memory, write_boot_structures};
use crate::vcpu;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// A VM with memory, image and vCPU ready to run, but no devices yet.
pub struct BootedMachine {
    /// The KVM system handle.
    pub kvm: Kvm,
    /// The VM.
    pub vm: VmFd,
    /// Its single vCPU.
    pub vcpu: VcpuFd,
    /// Guest RAM.
    pub mem: GuestMemoryMmap,
    /// Where the image was loaded.
    pub image: LoadedImage,
}

/// Creates the KVM VM, loads the image, writes the boot structures and sets up the vCPU.
/// With `dirty_log`, KVM tracks the pages the guest writes (for memory digests).
pub fn boot(
    image: &std::path::Path,
    mem_size: u64,
    cmdline: &str,
    virtio_slots: u32,
    dirty_log: bool,
) -> Result<BootedMachine, VmError> {
    // Load before touching KVM, so a bad image is reported as such even without /dev/kvm.
    let mem = create_guest_memory(mem_size)?;
    let loaded = load_elf(&mem, image)?;
    write_boot_structures(&mem, cmdline, virtio_slots)?;

    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    let vm = kvm.create_vm().map_err(VmError::CreateVm)?;
    for (slot, region) in mem.iter().enumerate() {
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if dirty_log {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which the returned
        // BootedMachine keeps alive as long as the VM fd; slots do not overlap.
        unsafe { vm.set_user_memory_region(region_desc) }.map_err(VmError::RegisterMemory)?;
    }
    let vcpu = vm.create_vcpu(0).map_err(VmError::CreateVcpu)?;
    vcpu::configure_vcpu(&kvm, &vcpu, loaded.entry)?;
    Ok(BootedMachine {
        kvm,
        vm,
        vcpu,
        mem,
        image: loaded,
    })
}
