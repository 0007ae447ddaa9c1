"""Delta streams (docs/delta-format.md): the one format changed blocks travel in, over the wire, through
the replica's spool and on seed media. Encode with DeltaEncoder or the sources helpers; decode with
DeltaDecoder, which yields only verified frames; verify_stream and apply_stream cover the usual passes."""
from .apply import ApplyStats, apply_stream, checking_decoder, verified
from .decoder import DeltaDecoder, Frame, verify_stream
from .encoder import DeltaEncoder, EncodeStats
from .format import (DEFAULT_BLOCK, MAX_BLOCK, DeltaFormatError, FrameKind, StreamHeader, Trailer,
                     UnsupportedDeltaVersion)
from .sources import encode_disk, encode_extents, encode_log

__all__ = ["ApplyStats", "DEFAULT_BLOCK", "DeltaDecoder", "DeltaEncoder", "DeltaFormatError", "EncodeStats", "Frame",
           "FrameKind", "MAX_BLOCK", "StreamHeader", "Trailer", "UnsupportedDeltaVersion", "apply_stream",
           "checking_decoder", "encode_disk", "encode_extents", "encode_log", "verified", "verify_stream"]
