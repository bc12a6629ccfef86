"""Following planned pieces (`planning.transforms` Piece: a chunk's box, strided source rows, a destination box)
with numpy, to check the planner's pieces cover each output element exactly once."""
import numpy as np


def assemble(pieces, out_shape, source):
    """Follow the pieces with numpy, counting how often each output element is written."""
    out = np.zeros(out_shape, dtype=source.dtype)
    hits = np.zeros(out_shape, dtype=np.int64)
    for p in pieces:
        c = p.chunk
        chunk = source[tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes))]
        extra = chunk.ndim - len(out_shape)
        sl = []
        for sd in range(chunk.ndim):
            k = sd - extra
            if k < 0:
                sl.append(p.src_start[sd])
            else:
                step = p.src_step if k == max(0, -extra) else 1
                sl.append(slice(p.src_start[sd], p.src_start[sd] + (p.sizes[k] - 1) * step + 1, step))
        box = tuple(slice(o, o + s) for o, s in zip(p.dst_start, p.sizes))
        out[box] = chunk[tuple(sl)].reshape([p.sizes[k] for k in range(len(out_shape))])
        hits[box] += 1
    return out, hits
