"""What Hozon can read: file systems (``files``), and later QEMU and libvirt VMs."""
