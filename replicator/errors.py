"""One exception class per failure, each with its message and process exit code.

Every error the project raises on bad input derives from ReplicatorError, so callers (and fuzzers) can
tell "the input was wrong" from "the program is wrong": anything else escaping a parser is a bug.
"""
from __future__ import annotations


class ReplicatorError(Exception):
    """Base of every error replicator reports to a user."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class UsageError(ReplicatorError):
    """The command line or a request asked for something that makes no sense."""

    exit_code = 2


class FormatError(ReplicatorError):
    """A file does not follow its format: names the structure and the file offset where it broke."""

    exit_code = 3

    def __init__(self, structure: str, offset: int | None, problem: str, path: str | None = None):
        where = f" at offset {offset} (0x{offset:x})" if offset is not None else ""
        file = f"{path}: " if path else ""
        super().__init__(f"{file}{structure}{where}: {problem}")
        self.structure = structure
        self.offset = offset
        self.problem = problem
        self.path = path


class UnsupportedFeature(FormatError):
    """A well-formed file uses something this implementation does not understand (and must refuse)."""

    exit_code = 4


class LogReplayRequired(ReplicatorError):
    """A VHDX log must be replayed before the file can be read, and the file was opened read-only."""

    exit_code = 5


class ParentError(ReplicatorError):
    """A differencing disk's parent is missing, unreadable, or no longer the disk the child was made from."""

    exit_code = 6


class ConsistencyError(ReplicatorError):
    """`check` found an inconsistency; the message lists what and where."""

    exit_code = 7


class DiskIOError(ReplicatorError):
    """An operating-system I/O failure (disk full, permission, device error) while touching a disk."""

    exit_code = 8


class OutOfRange(ReplicatorError):
    """A read, write or trim reaches past the end of the virtual disk."""

    exit_code = 9


class ReadOnlyError(ReplicatorError):
    """A write was attempted on a disk opened read-only."""

    exit_code = 10


class SourceChanged(ReplicatorError):
    """The source was written while it was being resynced: the target is not a consistent copy yet."""

    exit_code = 11


class SequenceError(ReplicatorError):
    """A cycle does not follow what the replica holds (out of order, replayed, or for another disk)."""

    exit_code = 12


class ResyncCancelled(ReplicatorError):
    """The run stopped on request; the checkpoint lets the next run resume where it stopped."""

    exit_code = 130

    def __init__(self, message: str, blocks_done: int = 0, stats=None):
        super().__init__(message)
        self.blocks_done = blocks_done
        self.stats = stats              # ResyncStats of the part that was done


class KernelSelfTestError(ReplicatorError):
    """The native kernels gave a wrong known answer at start-up: a bad build, refuse to run."""

    exit_code = 70


class CannotListen(ReplicatorError):
    """A server could not listen on its address (the port is taken, or not ours to use)."""

    exit_code = 20


class ExportUnavailable(ReplicatorError):
    """A machine's export process could not be started, reached, or did what it was asked."""

    exit_code = 16


class ImageLocked(ReplicatorError):
    """Another process (QEMU, a VM, another replicator) holds the disk image's lock: it writes the image, or
    reads it and lets nobody write it. The message names the holder where it can be found."""

    exit_code = 15


class HypervisorError(ReplicatorError):
    """The virtual machine manager (libvirt) could not be reached or refused what was asked of a domain or
    a network; the message names the domain and the manager's own reason."""

    exit_code = 17


class DomainNotFound(HypervisorError):
    """No domain of that name is defined on the hypervisor."""


class DomainExists(HypervisorError):
    """A domain of that name is already defined (a failover or test failover would replace it)."""


class DomainStateError(HypervisorError):
    """The domain is not in a state that allows the operation (e.g. running where it must be shut off)."""


class NetworkError(HypervisorError):
    """A hypervisor network could not be created, found or deleted."""


class GuestAgentError(HypervisorError):
    """The guest agent is missing, did not answer in time, or refused the command (freeze, exec ...)."""

    exit_code = 18


class QuiesceExpired(GuestAgentError):
    """The guest was thawed by the watchdog before the quiesced block ended: what was taken meanwhile is not
    application-consistent."""
