"""The RISC-V RV64GC hart."""
