"""Exact class maps of bilinearly resized logits, without resizing every class at every pixel.

The official class map of a photo is the argmax of its logits resized twice, bilinearly with
align_corners=False: the stride-8 logits to the network input size, then to the photo's size. For a
12-megapixel photo with 150 classes the second resize alone is 1.8 billion values; the functions here give
the same argmax from a small part of them:

- `resized_argmax`: one resize (input-size logits, e.g. averaged sliding windows, to the photo's size);
- `upsampled_argmax`: both resizes, from the stride-8 logits (`UpsampledLogits`), as whole-mode inference
  and `post_process_semantic_segmentation` have them;
- `augmented_argmax`: test-time augmentation, the argmax of the maps' mean softmax (bounded through each
  map's log-sum-exp, see `_AugmentedMap`).

Every resized value is a convex combination of the values it interpolates, so a class can only win in a
region where its largest source value reaches the largest of the classes' smallest source values (less a
margin for rounding). Regions where one class passes are filled with it; elsewhere only the passing classes
are interpolated, with PyTorch's own CPU arithmetic (`interpolate_pair`), so that near-ties fall as in the
full resize, and the first of equal maxima wins, as in `argmax`.
"""

import bisect
from dataclasses import dataclass

import torch
from torch.nn import functional as F

# The margin of the class bound, in float32 epsilons of the largest |logit| (an interpolated value differs
# from its exact convex combination by a few roundings per resize), and the least upsampling (output pixels
# per input pixel) at which the pruned argmax is used instead of the direct resize.
ROUNDING_MARGIN = 16
PRUNING_MIN_UPSAMPLING = 4
# The least input-size map (classes x pixels) for which `upsampled_argmax` beats resizing it in full and
# `resized_argmax`: below, the resize costs less than the bookkeeping.
UPSAMPLED_MIN_ELEMENTS = 2**20
# PyTorch resizes maps of height + width <= 128 with its channels-last kernel, whose rounding differs from
# `interpolate_pair`'s: `upsampled_argmax` leaves such sizes to the direct resize.
SMALL_MAP_EDGES = 128
# Elements (classes x rows x columns) per band when resizing logits to the original size: bounds the peak
# memory of a resize + softmax in full (augmented maps) and of `resized_argmax`'s bound to about 64 MB each.
BAND_ELEMENTS = 2**24
# Input values (run pixels x candidate classes) and output pixels (x candidate classes) computed at once in
# the contested runs and cells of `upsampled_argmax` (bounds their memory).
REFINE_CHUNK_ELEMENTS = 2**21
CONTESTED_CHUNK_ELEMENTS = 2**22


def bilinear_source(out_length: int, in_length: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices and weights of PyTorch's bilinear resize (align_corners=False) along one axis:
    (lower, upper, weight) of each output position, its value being `lower * (1 - weight) + upper * weight`."""
    # As PyTorch's kernel: a float32 scale, the source coordinate rounded once to float32.
    scale = torch.tensor(in_length / out_length, dtype=torch.float32).item()
    positions = torch.arange(out_length, device=device, dtype=torch.float64)
    source = ((positions + 0.5) * scale - 0.5).float().clamp(min=0)
    lower = source.floor().long().clamp(max=in_length - 1)
    upper = (lower + 1).clamp(max=in_length - 1)
    weight = (source - lower).clamp(0, 1)
    return lower, upper, weight


def interpolate_pair(lower: torch.Tensor, upper: torch.Tensor, weight_lower: torch.Tensor, weight_upper: torch.Tensor):
    """One axis of PyTorch's CPU bilinear kernel, bit for bit: `fma(lower, weight_lower, upper * weight_upper)`
    (the compiled kernel contracts `t0 * w0 + t1 * w1` so; `addcmul` is a fused multiply-add). A 2-D value is
    this along the width, then along the height. Where a kernel rounds otherwise (another build, a GPU), the
    values differ in the last bit at most, so only classes tied within rounding can fall otherwise."""
    return torch.addcmul(upper * weight_upper, lower, weight_lower)


def rounding_margin(logits: torch.Tensor) -> float:
    """The slack of the class bounds: `ROUNDING_MARGIN` float32 epsilons of the largest |logit| (at least 1)."""
    low, high = torch.aminmax(logits)
    return ROUNDING_MARGIN * torch.finfo(torch.float32).eps * max(abs(float(low)), abs(float(high)), 1.0)


class ResizeCells:
    """One axis of the bilinear resize (align_corners=False) with its outputs grouped into cells: runs of
    consecutive outputs that read the same two source positions (`cell_lower`, `cell_upper`). Each cell is
    padded to `block` outputs by repeating its last one (the same value, written twice); `regular_block`
    is the largest cell but the two at the edges.

    cell_lower, cell_upper, cell_start, cell_count: (cells,). positions: (block, cells) the output index of
    each slot. weight_lower, weight_upper: (block, cells), each slot's weights as PyTorch's kernel has them
    (`1 - w`, `w`). cell_of: (out_length,) each output's cell.
    """

    def __init__(self, out_length: int, in_length: int, device):
        lower, upper, weight = bilinear_source(out_length, in_length, device)
        self.cell_count = torch.unique_consecutive(lower, return_counts=True)[1]
        self.cell_start = self.cell_count.cumsum(0) - self.cell_count
        self.cell_lower, self.cell_upper = lower[self.cell_start], upper[self.cell_start]
        self.cells, self.block = len(self.cell_count), int(self.cell_count.max())
        slots = torch.minimum(torch.arange(self.block, device=device)[:, None], self.cell_count - 1)
        self.positions = self.cell_start + slots
        self.weight_lower, self.weight_upper = (1 - weight)[self.positions], weight[self.positions]
        self.cell_of = torch.arange(self.cells, device=device).repeat_interleave(self.cell_count)
        # The most outputs of a cell away from the edges (where the clamped source positions gather more).
        self.regular_block = int(self.cell_count[1:-1].max()) if self.cells > 2 else self.block


def _pair_reduce(values: torch.Tensor, dim: int, lower: torch.Tensor, upper: torch.Tensor, reduce) -> torch.Tensor:
    """`reduce(values at lower, values at upper)` along `dim`, reading strided views, not copies, when the
    cells are consecutive source positions (always when upsampling)."""
    count, first = len(lower), int(lower[0])
    upper_shifted = count == 1 or bool((upper[:-1] == lower[:-1] + 1).all())
    if int(lower[-1]) - first != count - 1 or not upper_shifted:
        return reduce(values.index_select(dim, lower), values.index_select(dim, upper))
    shape = list(values.shape)
    shape[dim] = count
    result = values.new_empty(shape)
    pairs = count if int(upper[-1]) == int(lower[-1]) + 1 else count - 1  # the last cell may be clamped (upper == lower)
    reduce(values.narrow(dim, first, pairs), values.narrow(dim, first + 1, pairs), out=result.narrow(dim, 0, pairs))
    if pairs < count:
        result.narrow(dim, pairs, 1).copy_(values.narrow(dim, first + pairs, 1))
    return result


def pruning_pays(logits_size, size, num_labels: int) -> bool:
    """Whether the class-pruned argmax beats the direct resize: with several classes, when each source cell
    covers several output pixels (upsampling); the bound costs a few passes over the source logits."""
    return size[0] * size[1] >= PRUNING_MIN_UPSAMPLING * logits_size[0] * logits_size[1] and num_labels > 1


@torch.no_grad()
def resized_argmax(logits: torch.Tensor, size, band_elements: int = BAND_ELEMENTS) -> torch.Tensor:
    """`F.interpolate(logits[None], size, bilinear, align_corners=False)[0].argmax(0)` without the resize
    of every class at every pixel. (num_labels, h, w) float32 -> (height, width) int64.

    The bound runs over each cell's four input pixels, in bands of cell rows of about `band_elements`
    elements; the contested cells go to `_write_contested`.
    """
    num_labels, in_height, in_width = logits.shape
    height, width = int(size[0]), int(size[1])
    device = logits.device
    rows, columns = ResizeCells(height, in_height, device), ResizeCells(width, in_width, device)
    margin = rounding_margin(logits)
    segmentation = torch.empty(height, width, dtype=torch.long, device=device)
    band_cells = max(1, band_elements // (num_labels * in_width))
    flat = logits.reshape(-1)
    for first_cell in range(0, rows.cells, band_cells):
        cells = slice(first_cell, min(first_cell + band_cells, rows.cells))
        top, bottom = int(rows.cell_start[cells.start]), int(rows.cell_start[cells.stop - 1] + rows.cell_count[cells.stop - 1])
        row_max = _pair_reduce(logits, 1, rows.cell_lower[cells], rows.cell_upper[cells], torch.maximum)
        row_min = _pair_reduce(logits, 1, rows.cell_lower[cells], rows.cell_upper[cells], torch.minimum)
        cell_max = _pair_reduce(row_max, 2, columns.cell_lower, columns.cell_upper, torch.maximum)
        del row_max
        cell_min = _pair_reduce(row_min, 2, columns.cell_lower, columns.cell_upper, torch.minimum)
        del row_min
        # Where one class passes, it is the holder of the threshold (its upper bound is above its lower one).
        threshold, winner = cell_min.max(dim=0)
        del cell_min
        candidates = cell_max >= threshold.sub_(margin)  # (num_labels, band cells, column cells)
        del cell_max
        band = segmentation[top:bottom]
        band.copy_(winner.index_select(1, columns.cell_of).index_select(0, rows.cell_of[top:bottom] - cells.start))
        contested = (candidates.sum(dim=0) > 1).flatten().nonzero().squeeze(1)
        if len(contested):
            # (cell, class) pairs, cell by cell, classes ascending.
            pair_cell, klass = candidates.flatten(1)[:, contested].t().nonzero().unbind(1)
            cell = contested[pair_cell]
            cell_row, cell_column = cell // columns.cells + cells.start, cell % columns.cells
            corners = [
                flat.take(klass * (in_height * in_width) + rows_of[cell_row] * in_width + columns_of[cell_column])
                for rows_of in (rows.cell_lower, rows.cell_upper)
                for columns_of in (columns.cell_lower, columns.cell_upper)
            ]
            _write_contested(segmentation, rows, columns, cell_row, cell_column, klass, corners)
    return segmentation


def _write_contested(segmentation, rows: ResizeCells, columns: ResizeCells, cell_row, cell_column, klass, corners):
    """Writes into `segmentation` (height, width) the argmax over each contested cell's candidate classes at
    every output pixel of the cell, interpolated with the kernel's arithmetic.

    cell_row, cell_column, klass: (pairs,) candidate (cell, class) pairs, each cell's pairs together, classes
    ascending. corners: the class's values at the cell's upper-left, upper-right, lower-left and lower-right
    input pixels, four (pairs,) float32 tensors.
    """
    if not len(klass):
        return
    counts = torch.unique_consecutive(cell_row * columns.cells + cell_column, return_counts=True)[1]
    starts = counts.cumsum(0) - counts
    # The edge cells (clamped source positions) cover more outputs than the others: each kind its own block.
    edge_row = rows.cell_count[cell_row[starts]] > rows.regular_block
    edge_column = columns.cell_count[cell_column[starts]] > columns.regular_block
    for row_kind in (False, True):
        for column_kind in (False, True):
            kind = ((edge_row == row_kind) & (edge_column == column_kind)).nonzero().squeeze(1)
            if len(kind):
                block = (rows.block if row_kind else rows.regular_block, columns.block if column_kind else columns.regular_block)
                _write_cells(segmentation, rows, columns, starts[kind], counts[kind], cell_row, cell_column, klass, corners, block)


def _write_cells(segmentation, rows, columns, starts, counts, cell_row, cell_column, klass, corners, block):
    """`_write_contested` for cells of at most `block` (rows, columns) outputs: (block rows, block columns,
    cells) tensors, the cells innermost."""
    # Cells by decreasing number of candidates: at rank r, the cells with more than r candidates are a prefix.
    order = counts.argsort(descending=True, stable=True)
    starts, counts = starts[order], counts[order]
    block_rows, block_columns = block
    rank_type = torch.uint8 if int(counts[0]) <= 256 else torch.int32
    chunk = max(1, CONTESTED_CHUNK_ELEMENTS // (block_rows * block_columns))
    for first in range(0, len(starts), chunk):
        chunk_starts, chunk_counts = starts[first : first + chunk], counts[first : first + chunk]
        row, column = cell_row[chunk_starts], cell_column[chunk_starts]
        weight_top = rows.weight_lower[:block_rows, row][:, None, :]  # (block rows, 1, cells)
        weight_bottom = rows.weight_upper[:block_rows, row][:, None, :]
        weight_left, weight_right = columns.weight_lower[:block_columns, column], columns.weight_upper[:block_columns, column]
        best_value = best_rank = None
        active_per_rank = torch.bincount(chunk_counts).flip(0).cumsum(0).flip(0)[1:].tolist()
        for rank, active in enumerate(active_per_rank):
            pair = chunk_starts[:active] + rank
            upper_left, upper_right, lower_left, lower_right = (corner[pair] for corner in corners)
            left, right = weight_left[:, :active], weight_right[:, :active]
            upper = interpolate_pair(upper_left, upper_right, left, right)
            lower = interpolate_pair(lower_left, lower_right, left, right)
            value = interpolate_pair(upper, lower, weight_top[:, :, :active], weight_bottom[:, :, :active])
            if best_value is None:
                best_value = value
            elif best_rank is None:  # every contested cell has two candidates or more
                best_rank = (value > best_value).to(rank_type)  # strict: the first (lowest) class of equal maxima stays
                best_value = torch.maximum(best_value, value)
            else:
                best = best_value[:, :, :active]
                best_rank[:, :, :active].masked_fill_(value > best, rank)
                best[:] = torch.maximum(best, value)
        winner = klass[chunk_starts + best_rank.long()]
        position = rows.positions[:block_rows, row][:, None, :] * segmentation.shape[1] + columns.positions[:block_columns, column]
        segmentation.view(-1).index_put_((position.flatten(),), winner.flatten())


@dataclass(frozen=True)
class UpsampledLogits:
    """Stride-8 logits with the network input size they are resized to, the resize not yet done: the first of
    the official two resizes, left to whoever needs it, so that the class map at the original size skips most
    of it (`upsampled_argmax`).

    logits: (num_labels, h, w). size: (height, width) of the resize (the network input, padded or not).
    crop: the (height, width) of the image's region of it, at its top left (default: all of it).
    """

    logits: torch.Tensor
    size: tuple[int, int]
    crop: tuple[int, int] | None = None

    @property
    def valid_size(self) -> tuple[int, int]:
        return tuple(self.crop or self.size)

    def materialize(self) -> torch.Tensor:
        """(num_labels, *valid_size) float32: the resize (and crop) done."""
        resized = F.interpolate(self.logits[None].float(), size=tuple(self.size), mode="bilinear", align_corners=False)[0]
        if self.valid_size == tuple(self.size):
            return resized
        return resized[:, : self.valid_size[0], : self.valid_size[1]].contiguous()


def materialize(logit_map) -> torch.Tensor:
    """A logit map as a (num_labels, h, w) float32 tensor (`UpsampledLogits` resized)."""
    return logit_map.materialize() if isinstance(logit_map, UpsampledLogits) else logit_map


def upsampled_argmax_applies(upsampled: UpsampledLogits, size) -> bool:
    """Whether `upsampled_argmax` gives the map: several classes, the first resize upsampling (stride-8
    logits), and both resizes through PyTorch's generic kernel (more than `SMALL_MAP_EDGES` of height +
    width, a contiguous map). The second resize may enlarge, keep or shrink."""
    num_labels, height, width = upsampled.logits.shape
    resized = tuple(upsampled.size)
    return (
        num_labels > 1
        and resized[0] >= height and resized[1] >= width
        and sum(resized) > SMALL_MAP_EDGES and sum(size) > SMALL_MAP_EDGES
        and not upsampled.logits.is_contiguous(memory_format=torch.channels_last)
    )


def upsampled_argmax_pays(upsampled: UpsampledLogits, size) -> bool:
    """Whether `logits_to_prediction` takes `upsampled_argmax`: where it applies, the input-size map would
    hold at least `UPSAMPLED_MIN_ELEMENTS` values, and the logits are finite (the bounds' arithmetic; the
    full resize handles infinities and NaN as PyTorch does)."""
    valid = upsampled.valid_size
    return (
        upsampled.logits.shape[0] * valid[0] * valid[1] >= UPSAMPLED_MIN_ELEMENTS
        and upsampled_argmax_applies(upsampled, size)
        and bool(torch.isfinite(upsampled.logits).all())
    )


class _CoarseRuns:
    """One axis of the two resizes (logits -> network input -> original size), the first upsampling. The
    second resize's cells (`cells`) are grouped into runs: consecutive cells whose input pixels all
    interpolate the same range `low`..`high` of logits positions (at most `span` of them).

    first_cell, run_cells, first_input, run_inputs, low, high: (runs,): a run's cells, its input positions
    `first_input` ... `first_input + run_inputs - 1`. offset_lower, offset_upper: (cells,) each cell's two
    input positions from its run's first. run_of_cell: (cells,). source_*: the first resize's (lower,
    upper, weights) of each input position.
    """

    def __init__(self, out_length: int, in_length: int, resized_length: int, logits_length: int, device):
        self.cells = cells = ResizeCells(out_length, in_length, device)
        lower, upper, weight = bilinear_source(resized_length, logits_length, device)
        self.source_lower, self.source_upper = lower[:in_length], upper[:in_length]
        self.source_weight_lower, self.source_weight_upper = (1 - weight)[:in_length], weight[:in_length]
        low, high = self.source_lower[cells.cell_lower], self.source_upper[cells.cell_upper]
        self.run_cells = torch.unique_consecutive(low * logits_length + high, return_counts=True)[1]
        self.first_cell = self.run_cells.cumsum(0) - self.run_cells
        self.low, self.high = low[self.first_cell], high[self.first_cell]
        self.span = int((self.high - self.low).max()) + 1
        self.run_of_cell = torch.arange(len(self.run_cells), device=device).repeat_interleave(self.run_cells)
        self.first_input = cells.cell_lower[self.first_cell]
        self.run_inputs = cells.cell_upper[self.first_cell + self.run_cells - 1] - self.first_input + 1
        self.offset_lower = cells.cell_lower - self.first_input[self.run_of_cell]
        self.offset_upper = cells.cell_upper - self.first_input[self.run_of_cell]

    def range_reduce(self, values: torch.Tensor, dim: int, reduce) -> torch.Tensor:
        """`reduce` over each run's range of logits positions along `dim`: (..., logits_length, ...) -> (..., runs, ...)."""
        return _range_reduce(values, dim, self.low, self.high, reduce)


def _range_reduce(values: torch.Tensor, dim: int, low: torch.Tensor, high: torch.Tensor, reduce) -> torch.Tensor:
    """`reduce` over the positions `low[i]` ... `high[i]` along `dim`: (..., length, ...) -> (..., len(low), ...)."""
    length, span = values.shape[dim], int((high - low).max()) + 1
    if len(low) < length:  # fewer ranges than positions: gather each offset
        result = values.index_select(dim, low)
        for offset in range(1, span):
            result = reduce(result, values.index_select(dim, torch.minimum(low + offset, high)))
        return result
    windows = [values]  # windows[s]: `reduce` over s + 1 consecutive positions, at each first position
    for size in range(1, span):
        window = windows[-1].narrow(dim, 0, length - size)
        windows.append(torch.cat([reduce(window, values.narrow(dim, size, length - size)), values.narrow(dim, 0, size)], dim))
    return torch.cat(windows, dim).index_select(dim, (high - low) * length + low)


@torch.no_grad()
def upsampled_argmax(upsampled: UpsampledLogits, size) -> torch.Tensor:
    """The argmax of `upsampled.materialize()` resized to `size` (bilinear, align_corners=False), from the
    stride-8 logits. -> (height, width) int64. Use where `upsampled_argmax_applies`.

    Three levels: the bound over the logits each run of cells interpolates (a few logits per run, every
    class); within contested runs, the bound over each cell's four input pixels, for the run's candidates
    only (their input values computed, not the others'); the cells still contested go to `_write_contested`.
    """
    logits = upsampled.logits.float().contiguous()
    num_labels, height, width = logits.shape
    device = logits.device
    rows = _CoarseRuns(int(size[0]), upsampled.valid_size[0], int(upsampled.size[0]), height, device)
    columns = _CoarseRuns(int(size[1]), upsampled.valid_size[1], int(upsampled.size[1]), width, device)
    margin = rounding_margin(logits)
    # Columns first: the row pass then copies whole rows.
    run_max = rows.range_reduce(columns.range_reduce(logits, 2, torch.maximum), 1, torch.maximum)
    run_min = rows.range_reduce(columns.range_reduce(logits, 2, torch.minimum), 1, torch.minimum)
    threshold, winner = run_min.max(dim=0)
    candidates = run_max >= threshold.sub_(margin)  # (num_labels, row runs, column runs)
    contested = candidates.sum(dim=0) > 1
    cell_winner = winner.index_select(1, columns.run_of_cell).index_select(0, rows.run_of_cell)
    # The contested runs grouped by shape (cells and input positions per row run and per column run), and
    # their candidate pairs.
    runs = contested.nonzero()
    shape = torch.zeros(len(runs), dtype=torch.long, device=device)
    base = max(int(rows.run_inputs.max()), int(columns.run_inputs.max())) + 1
    for part in (rows.run_cells[runs[:, 0]], rows.run_inputs[runs[:, 0]], columns.run_cells[runs[:, 1]], columns.run_inputs[runs[:, 1]]):
        shape = shape * base + part
    order = shape.argsort(stable=True)
    runs, shape = runs[order], shape[order]
    pair_run, klass = candidates[:, runs[:, 0], runs[:, 1]].t().nonzero().unbind(1)  # by run, classes ascending
    group_ends = torch.unique_consecutive(shape, return_counts=True)[1].cumsum(0).tolist()
    pair_starts = torch.searchsorted(pair_run, torch.arange(len(runs) + 1, device=device)).tolist()  # per run
    pairs = []
    for group_start, group_end in zip([0, *group_ends[:-1]], group_ends):
        # Runs of one shape, a chunk at a time: about `REFINE_CHUNK_ELEMENTS` input values.
        run = int(runs[group_start, 0]), int(runs[group_start, 1])
        per_pair = int(rows.run_inputs[run[0]]) * int(columns.run_inputs[run[1]])
        limit = max(1, REFINE_CHUNK_ELEMENTS // per_pair)
        first = group_start
        while first < group_end:
            last = max(first + 1, bisect.bisect_right(pair_starts, pair_starts[first] + limit, first, group_end + 1) - 1)
            chunk_pairs = slice(pair_starts[first], pair_starts[last])
            pairs.append(_refine_runs(
                logits, runs[first:last], pair_run[chunk_pairs] - first, klass[chunk_pairs], rows, columns, margin,
                cell_winner,
            ))
            first = last
    segmentation = cell_winner.index_select(1, columns.cells.cell_of).index_select(0, rows.cells.cell_of)
    if pairs:
        cell_row, cell_column, klass, *corners = (torch.cat(parts) for parts in zip(*pairs))
        _write_contested(segmentation, rows.cells, columns.cells, cell_row, cell_column, klass, corners)
    return segmentation


def _refine_runs(logits, runs, pair_run, klass, rows: _CoarseRuns, columns: _CoarseRuns, margin: float, cell_winner):
    """The cell-level bound inside contested runs of one shape. runs: (runs, 2) their (row run, column run);
    pair_run, klass: (pairs,) each candidate pair's run (an index into `runs`) and class, by run, classes
    ascending. Writes the winner of every cell that one class holds into `cell_winner` and returns the still
    contested (cell row, cell column, class, four corner values) pairs, each cell's together, classes ascending."""
    device = logits.device
    row_run, column_run = runs[:, 0], runs[:, 1]
    values = _input_values(logits, klass, rows, row_run[pair_run], columns, column_run[pair_run])
    run_rows, run_columns = int(rows.run_cells[row_run[0]]), int(columns.run_cells[column_run[0]])
    # Each cell's four input values: (run rows, run columns, pairs) each.
    row_cells, column_cells = rows.first_cell[row_run[pair_run]], columns.first_cell[column_run[pair_run]]
    upper, lower = (
        _select(values, 0, offsets[row_cells + torch.arange(run_rows, device=device)[:, None]])
        for offsets in (rows.offset_lower, rows.offset_upper)
    )
    column_offsets = [
        offsets[column_cells + torch.arange(run_columns, device=device)[:, None]]
        for offsets in (columns.offset_lower, columns.offset_upper)
    ]
    corners = tuple(_select(half, 1, offsets) for half in (upper, lower) for offsets in column_offsets)
    cell_max = torch.maximum(torch.maximum(corners[0], corners[1]), torch.maximum(corners[2], corners[3]))
    cell_min = torch.minimum(torch.minimum(corners[0], corners[1]), torch.minimum(corners[2], corners[3]))
    # Reductions over each run's pairs: pairs first, (pairs, cells of the run).
    cell_max, cell_min = (bound.reshape(-1, len(klass)).t().contiguous() for bound in (cell_max, cell_min))
    threshold = cell_min.new_full((len(runs), cell_min.shape[1]), -torch.inf)
    threshold.scatter_reduce_(0, pair_run[:, None].expand_as(cell_min), cell_min, "amax")
    passing = cell_max >= threshold.sub_(margin).index_select(0, pair_run)
    count = torch.zeros(threshold.shape, dtype=torch.long, device=device).index_add_(0, pair_run, passing.long())
    holder = torch.zeros_like(count).index_add_(0, pair_run, passing * klass[:, None])
    cell_rows = rows.first_cell[row_run] + torch.arange(run_rows, device=device)[:, None]  # (run rows, runs)
    cell_columns = columns.first_cell[column_run] + torch.arange(run_columns, device=device)[:, None]
    # Cells of several candidates are overwritten later.
    cell_winner[cell_rows[:, None, :], cell_columns[None, :, :]] = holder.t().reshape(run_rows, run_columns, -1)
    # (cell of the run, pair) order: a cell's pairs are together (its run's), classes ascending.
    cell, pair = (passing & (count > 1).index_select(0, pair_run)).t().nonzero().unbind(1)
    row, column, run = cell // run_columns, cell % run_columns, pair_run[pair]
    return (
        cell_rows[row, run], cell_columns[column, run], klass[pair],
        *(corner[row, column, pair] for corner in corners),
    )


def _input_values(logits, klass, rows: _CoarseRuns, row_run, columns: _CoarseRuns, column_run) -> torch.Tensor:
    """Each (run, class) pair's input-size values over its run's input positions, with the first resize's
    arithmetic: (pairs,) -> (run input rows, run input columns, pairs) float32."""
    device = logits.device
    num_labels, height, width = logits.shape
    run_rows, run_columns = int(rows.run_inputs[row_run[0]]), int(columns.run_inputs[column_run[0]])
    input_rows = rows.first_input[row_run] + torch.arange(run_rows, device=device)[:, None]
    input_columns = columns.first_input[column_run] + torch.arange(run_columns, device=device)[:, None]
    low = rows.low[row_run]
    logits_rows = torch.minimum(low + torch.arange(rows.span, device=device)[:, None], rows.high[row_run])  # (span, pairs)
    row_base = (klass * (height * width) + logits_rows * width)[:, None, :]
    flat = logits.view(-1)
    # Along the width, at each logits row of the run's range ...
    horizontal = interpolate_pair(
        flat.take(row_base + columns.source_lower[input_columns]),
        flat.take(row_base + columns.source_upper[input_columns]),
        columns.source_weight_lower[input_columns],
        columns.source_weight_upper[input_columns],
    )  # (span, run input columns, pairs)
    # ... then along the height.
    upper, lower = (_select(horizontal, 0, source[input_rows] - low) for source in (rows.source_lower, rows.source_upper))
    return interpolate_pair(
        upper, lower, rows.source_weight_lower[input_rows][:, None, :], rows.source_weight_upper[input_rows][:, None, :]
    )


def _select(values: torch.Tensor, dim: int, offsets: torch.Tensor) -> torch.Tensor:
    """Positions `offsets` (n, pairs) along `dim` (0 or 1) of (a, b, pairs) `values`, each pair its own:
    -> (n, b, pairs) or (a, n, pairs). One `index_select` when every pair has the same offsets."""
    if bool((offsets == offsets[:, :1]).all()):  # the same for every pair (as in regular runs)
        return values.index_select(dim, offsets[:, 0])
    shape = list(values.shape)
    shape[dim] = offsets.shape[0]
    index = offsets[:, None, :] if dim == 0 else offsets[None, :, :]
    return values.gather(dim, index.expand(shape))


# ---------------------------------------------------------------------------- test-time augmentation

# `augmented_argmax`: its output tiles (pixels a side), its slack in log-probability beyond float rounding
# (the full computation's own softmax and sums round within about 1e-5), and the undecided pixels computed
# in full at once (x classes x maps: bounds their memory).
AUGMENTED_TILE = 8
AUGMENTED_LOG_MARGIN = 1e-4
AUGMENTED_EXACT_PIXELS = 2**15
# The least output (pixels x classes x maps) for which `logits_to_prediction` takes `augmented_argmax`.
AUGMENTED_MIN_ELEMENTS = 2**24


def augmented_argmax_pays(logit_maps: list, size) -> bool:
    """Whether `logits_to_prediction` takes `augmented_argmax` for these input-size maps: several maps of
    several classes, a large output (at least `AUGMENTED_MIN_ELEMENTS` resized values in all) and finite
    logits."""
    num_labels = logit_maps[0].shape[0]
    return (
        len(logit_maps) > 1 and num_labels > 1
        and size[0] * size[1] * num_labels * len(logit_maps) >= AUGMENTED_MIN_ELEMENTS
        and all(bool(torch.isfinite(logits).all()) for logits in logit_maps)
    )


class _AugmentedMap:
    """One augmentation's input-size logits (num_labels, h, w), resized to the output size, with what bounds
    its softmax: the log-sum-exp over classes at each input pixel (`lse`) and, per cell of four input
    pixels, how far the log-sum-exp of an interpolated pixel can fall below the interpolation of `lse`
    (`curvature`: the log-sum-exp is convex and its second derivative along a step d is the variance of d
    under the softmax, at most range(d)^2 / 4, so each linear interpolation overestimates it by at most
    range(d)^2 / 32, d a step between the cell's pixels: (range(dh)^2 + range(dv)^2) / 32)."""

    def __init__(self, logits: torch.Tensor, size):
        self.logits = logits.float().contiguous()
        num_labels, height, width = self.logits.shape
        device = self.logits.device
        self.rows = bilinear_source(int(size[0]), height, device)
        self.columns = bilinear_source(int(size[1]), width, device)
        self.lse = torch.logsumexp(self.logits, dim=0)
        across, down = (torch.aminmax(self.logits.diff(dim=dim), dim=0) for dim in (2, 1))
        across, down = ((step.max - step.min).square_() for step in (across, down))  # (h, w - 1), (h - 1, w)
        curvature = torch.zeros(height, width, device=device)
        if width > 1:
            across = torch.maximum(across, torch.cat([across[1:], across[-1:]]))  # the cell's two rows
            curvature[:, :-1] += across
            curvature[:, -1] += across[:, -1]
        if height > 1:
            down = torch.maximum(down, torch.cat([down[:, 1:], down[:, -1:]], dim=1))  # the cell's two columns
            curvature[:-1] += down
            curvature[-1] += down[-1]
        self.curvature = curvature.div_(32)
        scale = float(self.logits.abs().max()) + float(self.lse.abs().max()) + 1.0
        self.margin = AUGMENTED_LOG_MARGIN + 64 * torch.finfo(torch.float32).eps * scale

    def tile_bounds(self, tile_rows, tile_columns):
        """Over each tile's input pixels: (num_labels, tiles) largest and smallest logits, and (tiles,) the
        least log-sum-exp less the curvature and margin, and the largest plus the margin."""
        (row_low, row_high), (column_low, column_high) = (
            (source[0][first], source[1][last]) for source, (first, last) in ((self.rows, tile_rows), (self.columns, tile_columns))
        )
        first, last = int(row_low[0]), int(row_high[-1])
        row_low, row_high = row_low - first, row_high - first

        def window(values, reduce):
            values = _range_reduce(values[..., first : last + 1, :], values.dim() - 2, row_low, row_high, reduce)
            return _range_reduce(values, values.dim() - 1, column_low, column_high, reduce)

        least = window(self.lse, torch.minimum) - window(self.curvature, torch.maximum) - self.margin
        return window(self.logits, torch.maximum), window(self.logits, torch.minimum), least, window(self.lse, torch.maximum) + self.margin

    def interpolate(self, values: torch.Tensor, klass, rows, columns) -> torch.Tensor:
        """values (num_labels or 1, h, w) resized at output pixels (rows x columns), bit for bit as the full
        resize: klass, rows, columns broadcast together (classes None: `values` has one channel)."""
        height, width = values.shape[1:]
        (top, bottom, row_weight), (left, right, column_weight) = (
            tuple(part[index] for part in source) for source, index in ((self.rows, rows), (self.columns, columns))
        )
        flat = values.reshape(-1)
        base = 0 if klass is None else klass * (height * width)
        upper = interpolate_pair(flat.take(base + top * width + left), flat.take(base + top * width + right), 1 - column_weight, column_weight)
        lower = interpolate_pair(flat.take(base + bottom * width + left), flat.take(base + bottom * width + right), 1 - column_weight, column_weight)
        return interpolate_pair(upper, lower, 1 - row_weight, row_weight)


@torch.no_grad()
def augmented_argmax(logit_maps: list, size) -> torch.Tensor:
    """The class map of test-time augmentation: the argmax over classes of the mean over maps of the softmax
    of each (num_labels, h_m, w_m) input-size map resized to `size` (bilinear, align_corners=False), as the
    full computation (`logits_to_prediction`'s bands) gives it, without the softmax of every class at every
    pixel. -> (height, width) int64.

    A map's softmax at an output pixel is exp(logit - log-sum-exp); the log-sum-exp lies between the
    interpolation of the per-pixel log-sum-exp and that less the curvature term (`_AugmentedMap`). Per tile
    of output pixels, these bounds leave a few candidate classes (their largest and smallest logits over the
    tile's input pixels); inside contested tiles the candidates' values are interpolated per pixel, and a
    pixel whose best lower bound does not clear every other candidate's upper bound (a tie within the
    bounds' slack) is computed in full, every class, as the full computation does.
    """
    height, width = int(size[0]), int(size[1])
    maps = [_AugmentedMap(logits, size) for logits in logit_maps]
    num_labels, device = maps[0].logits.shape[0], maps[0].logits.device
    tile = AUGMENTED_TILE
    column_tiles = torch.arange(0, width, tile, device=device)
    tile_columns = (column_tiles, (column_tiles + tile - 1).clamp(max=width - 1))
    segmentation = torch.empty(height, width, dtype=torch.long, device=device)
    band_tiles = max(1, BAND_ELEMENTS // (num_labels * len(column_tiles)))
    for first_row in range(0, height, band_tiles * tile):
        row_tiles = torch.arange(first_row, min(first_row + band_tiles * tile, height), tile, device=device)
        tile_rows = (row_tiles, (row_tiles + tile - 1).clamp(max=height - 1))
        upper_sum = lower_sum = 0
        for augmented in maps:
            largest, smallest, least_lse, most_lse = augmented.tile_bounds(tile_rows, tile_columns)
            upper_sum = upper_sum + (largest - least_lse).exp_()
            lower_sum = lower_sum + (smallest - most_lse).exp_()
        threshold, winner = lower_sum.max(dim=0)  # (row tiles, column tiles)
        candidates = upper_sum >= threshold
        band = segmentation[first_row : first_row + len(row_tiles) * tile]
        pixel_rows = torch.arange(band.shape[0], device=device) // tile
        band.copy_(winner.index_select(1, torch.arange(width, device=device) // tile).index_select(0, pixel_rows))
        contested = (candidates.sum(dim=0) > 1).flatten().nonzero().squeeze(1)
        if len(contested):
            pair_tile, klass = candidates.flatten(1)[:, contested].t().nonzero().unbind(1)
            _resolve_augmented_tiles(maps, band, first_row, contested[pair_tile], klass, len(column_tiles), width)
    return segmentation


def _resolve_augmented_tiles(maps, band, first_row, tile, klass, column_tiles, width):
    """Writes into `band` (rows `first_row`...) the class of every pixel of the contested tiles: from the
    candidates' per-pixel bounds where one clears the others, else computed in full. tile, klass: (pairs,)
    candidate pairs (tile index within the band, class), grouped by tile."""
    device, size = band.device, AUGMENTED_TILE
    offsets = torch.arange(size, device=device)
    rows = first_row + (tile // column_tiles)[:, None] * size + offsets  # (pairs, tile rows)
    columns = (tile % column_tiles)[:, None] * size + offsets
    valid_rows, valid_columns = rows < first_row + band.shape[0], columns < width
    rows, columns = torch.where(valid_rows, rows, rows[:, :1]), torch.where(valid_columns, columns, columns[:, :1])
    rows, columns = rows[:, :, None], columns[:, None, :]  # (pairs, size, 1), (pairs, 1, size)
    tiles, pair_tile = torch.unique_consecutive(tile, return_inverse=True)
    first_pair = torch.searchsorted(pair_tile, torch.arange(len(tiles), device=device))
    tile_rows, tile_columns = rows[first_pair], columns[first_pair]
    lower = upper = 0
    for augmented in maps:
        logit = augmented.interpolate(augmented.logits, klass[:, None, None], rows, columns)
        # The log-sum-exp and its curvature term are the pixel's, whatever the class: once per tile.
        lse = augmented.interpolate(augmented.lse[None], None, tile_rows, tile_columns).index_select(0, pair_tile)
        curvature = augmented.curvature[augmented.rows[0][tile_rows], augmented.columns[0][tile_columns]]
        curvature = curvature.index_select(0, pair_tile)
        lower = lower + (logit - lse - augmented.margin).exp_()
        upper = upper + (logit - lse + curvature + augmented.margin).exp_()
    # Per tile pixel: the best lower bound, and the best upper bound of the other candidates. (pairs, pixels)
    lower, upper = lower.flatten(1), upper.flatten(1)
    index = pair_tile[:, None].expand_as(lower)
    best = lower.new_full((len(tiles), lower.shape[1]), -torch.inf).scatter_reduce_(0, index, lower, "amax")
    is_best = lower == best.index_select(0, pair_tile)
    holders = torch.zeros(best.shape, dtype=torch.long, device=device).scatter_add_(0, index, is_best.long())
    winner = torch.zeros(best.shape, dtype=torch.long, device=device).scatter_add_(0, index, is_best * klass[:, None])
    others = upper.masked_fill(is_best, -torch.inf)
    rival = upper.new_full(best.shape, -torch.inf).scatter_reduce_(0, index, others, "amax")
    decided = (holders == 1) & (best > rival)
    pixel_rows, pixel_columns = tile_rows.expand(-1, -1, size).flatten(1), tile_columns.expand(-1, size, -1).flatten(1)
    inside = (valid_rows[first_pair][:, :, None] & valid_columns[first_pair][:, None, :]).flatten(1)
    band[pixel_rows[decided & inside] - first_row, pixel_columns[decided & inside]] = winner[decided & inside]
    undecided = ~decided & inside
    _augmented_in_full(maps, band, first_row, pixel_rows[undecided], pixel_columns[undecided])


def _augmented_in_full(maps, band, first_row, rows, columns):
    """The class of pixels (rows, columns) as the full computation has it: every class of every map resized,
    soft-maxed, summed in order and divided by the number of maps, then the first maximum."""
    num_labels = maps[0].logits.shape[0]
    classes = torch.arange(num_labels, device=band.device)[:, None]
    for start in range(0, len(rows), AUGMENTED_EXACT_PIXELS):
        pixel_rows, pixel_columns = rows[start : start + AUGMENTED_EXACT_PIXELS], columns[start : start + AUGMENTED_EXACT_PIXELS]
        probabilities = None
        for augmented in maps:
            resized = augmented.interpolate(augmented.logits, classes, pixel_rows, pixel_columns)  # (num_labels, pixels)
            resized = resized.softmax(dim=0)
            probabilities = resized if probabilities is None else probabilities.add_(resized)
        probabilities.div_(len(maps))
        band[pixel_rows - first_row, pixel_columns] = probabilities.max(dim=0)[1]
