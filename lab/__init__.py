"""Test lab: netns hosts on the running kernel, and guests (user-mode Linux, qemu) with GRE."""
