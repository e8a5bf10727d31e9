"""capfaas: a serverless function platform on capability VMs (cVMs).

Every function instance runs in its own cVM; all cVMs share one address space, and data passes
between functions as bounded, permission-restricted, unforgeable capabilities, without copies.
Hardware comes from a backend: ``emulated`` (a software model of Arm Morello capabilities) or
``morello`` (real CHERI hardware).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
