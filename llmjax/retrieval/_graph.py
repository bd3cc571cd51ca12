"""Numba kernels shared by the graph indexes (HNSW, Filtered-DiskANN / Vamana): one implementation of each.

A graph layer is `links` int32 [slots, max_degree] (neighbour rows, padded with -1) plus `slot_of` int32 [rows]
(the slot of each row in that layer: identity for a flat graph or HNSW's layer 0, a compact numbering for HNSW's
upper layers). Vectors are float32 [rows, dim]; scores are "larger is nearer" (ip, or minus the squared L2 distance;
cosine arrives normalized and is ip).

- `beam_search`: best-first search with a sorted list of `width` candidates (HNSW's ef, Vamana's L), a
  generation-stamped visited array, and optional label admission (Filtered-DiskANN expands only nodes that carry a
  wanted label). A beam of width 1 is HNSW's greedy descent.
- `select_neighbours`: the robust prune (Vamana) = HNSW's neighbour heuristic when alpha = 1, label-aware as
  Filtered-DiskANN's FilteredRobustPrune when asked.
- `search_batch`: queries in parallel (prange over chunks, one visited array per chunk); removed rows are traversed
  but never returned; the beam grows until k admitted rows are found or everything reachable was seen (this is
  also the post-filtering baseline).
- `link_batch`: parallel batch insertion: every new row of a batch searches the graph as it was before the batch,
  prunes its candidates to a forward list, then reverse links are merged per target (one thread per target, pruned
  when over the degree bound). No locks, and the result does not depend on the number of threads.
- `repair_removed`: FreshDiskANN-style repair: a live node that pointed to removed nodes is re-pruned over its live
  neighbours and the live neighbours of its removed ones; removed nodes lose their lists (unreachable afterwards).
- `connect_unreachable`: after a build or a repair, every live row gets a path from the entry point (the prune can
  leave a row with no in-edge).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from llmjax.retrieval.base import RetrievalError

IP, L2 = 0, 1  # metric codes: cosine is IP on normalized vectors

# A batch insert is a few short parallel loops; GNU OpenMP (numba's default layer where TBB is absent) lets idle
# threads spin between loops, and on a machine shared with other work those spinning threads take the cores the
# working ones need (measured: a 2-thread build 8x slower than 1 thread). Passive waiting unless the user chose.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def metric_code(metric: str) -> int:
    return L2 if metric == "l2" else IP


@contextmanager
def numba_threads(threads: int | None):
    """Run the enclosed kernels on `threads` numba threads (None: numba's default), restoring the count after.
    Parallel loops hand out their chunks dynamically (one at a time), so a thread that the OS pauses on a busy
    machine does not hold the others at the end of every batch."""
    before, chunksize = numba.get_num_threads(), numba.get_parallel_chunksize()
    if threads is not None:
        numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
    numba.set_parallel_chunksize(1)
    try:
        yield
    finally:
        numba.set_num_threads(before)
        numba.set_parallel_chunksize(chunksize)


# ---- scores and labels -------------------------------------------------------------------------------------------

@intrinsic
def prefetch_row(typingctx, matrix, row):
    """Ask the CPU to start loading every 64-byte line of matrix[row] (C-contiguous 2-D) into its caches: LLVM's
    prefetch hint, which numba does not expose. A graph search reads each neighbour's vector once, from anywhere in
    memory; prefetched together, their cache misses overlap instead of queueing one behind the other."""
    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        array = context.make_array(array_type)(context, builder, args[0])
        zero = context.get_constant(types.intp, 0)
        index = context.cast(builder, args[1], signature.args[1], types.intp)
        start = builder.bitcast(cgutils.get_item_pointer(context, builder, array_type, array, [index, zero]),
                                ir.IntType(8).as_pointer())
        hint = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer()] + [ir.IntType(32)] * 3)
        function = cgutils.get_or_insert_function(builder.module, hint, "llvm.prefetch.p0i8")
        row_bytes = builder.mul(builder.extract_value(array.shape, 1),
                                context.get_constant(types.intp, context.get_abi_sizeof(
                                    context.get_data_type(array_type.dtype))))
        read, keep_in_all_levels, data = (ir.Constant(ir.IntType(32), v) for v in (0, 3, 1))
        with cgutils.for_range_slice(builder, zero, row_bytes, context.get_constant(types.intp, 64)) as (offset, _):
            builder.call(function, [builder.gep(start, [offset]), read, keep_in_all_levels, data])
        return context.get_dummy_value()

    return types.void(matrix, row), codegen


@njit(cache=True, fastmath=True, inline="always")
def score(a, b, metric):
    """Larger is nearer: a . b, or -|a - b|^2 (a, b: [dim] float32)."""
    total = np.float32(0.0)
    if metric == L2:
        for i in range(a.shape[0]):
            d = a[i] - b[i]
            total += d * d
        return -total
    for i in range(a.shape[0]):
        total += a[i] * b[i]
    return total


@njit(cache=True, inline="always")
def prune_distance(s, metric):
    """The distance the prune compares (alpha multiplies it): squared L2, or 1 - ip (hnswlib's ip distance)."""
    return -s if metric == L2 else np.float32(1.0) - s


@njit(cache=True)
def carries_any(row, label_offsets, label_values, wanted):
    """Does `row` carry one of the sorted labels `wanted`? (an empty `wanted` admits every row)"""
    if wanted.shape[0] == 0:
        return True
    i, end, j = label_offsets[row], label_offsets[row + 1], 0
    while i < end and j < wanted.shape[0]:
        if label_values[i] == wanted[j]:
            return True
        if label_values[i] < wanted[j]:
            i += 1
        else:
            j += 1
    return False


@njit(cache=True)
def has_label(row, label, label_offsets, label_values):
    for i in range(label_offsets[row], label_offsets[row + 1]):
        if label_values[i] == label:
            return True
    return False


@njit(cache=True)
def covers_shared(cover, p, q, label_offsets, label_values):
    """Filtered-DiskANN's prune condition: does `cover` carry every label shared by p and q?"""
    i, end_i = label_offsets[p], label_offsets[p + 1]
    j, end_j = label_offsets[q], label_offsets[q + 1]
    while i < end_i and j < end_j:
        a, b = label_values[i], label_values[j]
        if a == b:
            if not has_label(cover, a, label_offsets, label_values):
                return False
            i += 1
            j += 1
        elif a < b:
            i += 1
        else:
            j += 1
    return True


# ---- beam search -------------------------------------------------------------------------------------------------

@njit(cache=True)
def beam_insert(rows, scores, done, count, width, row, s):
    """Insert (row, s) into the sorted beam (nearest first, `count` held, at most `width`).
    Returns (new count, the position it took, or -1 when it was not near enough)."""
    if count == width and s <= scores[count - 1]:
        return count, -1
    pos = count if count < width else width - 1
    while pos > 0 and scores[pos - 1] < s:
        rows[pos], scores[pos], done[pos] = rows[pos - 1], scores[pos - 1], done[pos - 1]
        pos -= 1
    rows[pos], scores[pos], done[pos] = row, s, False
    return min(count + 1, width), pos


@njit(cache=True, fastmath=True)
def beam_search(query, vectors, links, slot_of, entries, width, metric, label_offsets, label_values, wanted,
                labeled_only, visited, stamp, rows, scores, done, expanded, expanded_scores):
    """Best-first search of one layer from `entries`, keeping the `width` nearest seen.

    visited: int32 [rows], `stamp` marks this search (no clearing between searches). labeled_only: only rows that
    carry a label of `wanted` are scored and expanded (FilteredGreedySearch). rows / scores / done: the beam
    buffers [>= width]; expanded / expanded_scores: the expanded rows in order (Vamana prunes over them; may be
    empty). Returns (beam count, expanded count). Ends when every row in the beam was expanded."""
    count = 0
    fresh_rows, fresh_scores = np.empty(links.shape[1], np.int32), np.empty(links.shape[1], np.float32)
    for e in entries:
        if e < 0 or visited[e] == stamp:
            continue
        visited[e] = stamp
        if labeled_only and not carries_any(e, label_offsets, label_values, wanted):
            continue
        count, _ = beam_insert(rows, scores, done, count, width, e, score(query, vectors[e], metric))
    num_expanded, cursor = 0, 0
    while cursor < count:
        node = rows[cursor]
        done[cursor] = True
        if num_expanded < expanded.shape[0]:
            expanded[num_expanded], expanded_scores[num_expanded] = node, scores[cursor]
            num_expanded += 1
        following = cursor + 1  # the nearest unexpanded place may move up when a nearer row comes in
        slot = slot_of[node]
        fresh = 0  # the node's unvisited (admitted) neighbours, gathered first
        for j in range(links.shape[1]):
            neighbour = links[slot, j]
            if neighbour < 0:
                break
            if visited[neighbour] == stamp:
                continue
            visited[neighbour] = stamp
            if labeled_only and not carries_any(neighbour, label_offsets, label_values, wanted):
                continue
            prefetch_row(vectors, neighbour)
            fresh_rows[fresh] = neighbour
            fresh += 1
        for j in range(fresh):
            fresh_scores[j] = score(query, vectors[fresh_rows[j]], metric)
        for j in range(fresh):
            count, pos = beam_insert(rows, scores, done, count, width, fresh_rows[j], fresh_scores[j])
            if 0 <= pos < following:
                following = pos
        cursor = following
        while cursor < count and done[cursor]:
            cursor += 1
    return count, num_expanded


@njit(cache=True, parallel=True)
def search_batch(queries, vectors, links, slot_of, entries, width, k, metric, removed, label_offsets, label_values,
                 filter_offsets, filter_values, labeled_only, grow, chunk):
    """k nearest admitted rows for each query: (scores float32 [q, k], rows int32 [q, k]; -inf / -1 where fewer).

    entries int32 [q, e] (-1 padded). Admitted: not removed and carrying a label of the query's filter set
    (filter_values[filter_offsets[i]:filter_offsets[i + 1]], empty = no filter). labeled_only: traverse admitted
    labels only (Filtered-DiskANN) instead of traversing everything and filtering the results (post-filtering).
    grow: double the beam until k are admitted or the beam was not filled (everything reachable seen)."""
    num_queries, num_rows = queries.shape[0], removed.shape[0]
    out_scores = np.full((num_queries, k), -np.inf, np.float32)
    out_rows = np.full((num_queries, k), -1, np.int32)
    no_expanded, no_expanded_scores = np.empty(0, np.int32), np.empty(0, np.float32)
    for c in prange(-(-num_queries // chunk)):
        visited = np.zeros(vectors.shape[0], np.int32)
        stamp = 0
        capacity = max(width, k)
        rows, scores, done = np.empty(capacity, np.int32), np.empty(capacity, np.float32), np.empty(capacity, np.bool_)
        for i in range(c * chunk, min((c + 1) * chunk, num_queries)):
            wanted = filter_values[filter_offsets[i]:filter_offsets[i + 1]]
            beam = max(width, k)
            while True:
                if beam > capacity:
                    capacity = beam
                    rows, scores = np.empty(capacity, np.int32), np.empty(capacity, np.float32)
                    done = np.empty(capacity, np.bool_)
                stamp += 1
                count, _ = beam_search(queries[i], vectors, links, slot_of, entries[i], beam, metric, label_offsets,
                                       label_values, wanted, labeled_only, visited, stamp, rows, scores, done,
                                       no_expanded, no_expanded_scores)
                found = 0
                for j in range(count):
                    row = rows[j]
                    if found < k and not removed[row] and carries_any(row, label_offsets, label_values, wanted):
                        out_rows[i, found], out_scores[i, found] = row, scores[j]
                        found += 1
                if found >= k or not grow or count < beam or beam >= num_rows:
                    break
                out_rows[i, :] = -1
                out_scores[i, :] = -np.inf
                beam = min(2 * beam, num_rows)
    return out_scores, out_rows


# ---- neighbour selection -----------------------------------------------------------------------------------------

@njit(cache=True, fastmath=True)
def select_neighbours(base, pool_rows, pool_scores, count, cap, alpha, metric, vectors, label_offsets, label_values,
                      label_aware, out):
    """RobustPrune (Vamana) / the neighbour heuristic (HNSW, Malkov & Yashunin Alg. 4, alpha = 1).

    pool_rows / pool_scores [count]: candidates sorted nearest first (scores to `base`). A candidate c is dropped
    when an already selected s is alpha-closer to it than base is (alpha * d(s, c) <= d(base, c)): edges then
    spread over directions instead of crowding one cluster. label_aware: s may drop c only if s carries every
    label base and c share (FilteredRobustPrune), and the candidates that share a label with base are taken before
    the others, so edges that serve filtered search are never crowded out by unfiltered ones. Writes up to `cap`
    rows into out; returns how many."""
    taken = 0
    base_labels = label_values[label_offsets[base]:label_offsets[base + 1]] if label_aware else label_values[:0]
    for sharing in range(2 if label_aware and base_labels.shape[0] else 1):
        for i in range(count):
            candidate = pool_rows[i]
            if label_aware and base_labels.shape[0] and (
                    carries_any(candidate, label_offsets, label_values, base_labels) == (sharing == 1)):
                continue  # label-aware: candidates sharing a label with base first, the others fill what is left
            reach = prune_distance(pool_scores[i], metric)
            keep = True
            for j in range(taken):
                chosen = out[j]
                if alpha * prune_distance(score(vectors[chosen], vectors[candidate], metric), metric) <= reach:
                    if not label_aware or covers_shared(chosen, base, candidate, label_offsets, label_values):
                        keep = False
                        break
            if keep:
                out[taken] = candidate
                taken += 1
                if taken == cap:
                    return taken
    return taken


@njit(cache=True)
def _prune_into(base, pool_rows, count, links, slot, alpha, metric, vectors, label_offsets, label_values,
                label_aware):
    """Set base's list (links[slot]) to the pruned pool (any order): sorted by score to base first."""
    pool_scores = np.empty(count, np.float32)
    for i in range(count):
        pool_scores[i] = score(vectors[base], vectors[pool_rows[i]], metric)
    order = np.argsort(-pool_scores, kind="mergesort")
    chosen = np.full(links.shape[1], -1, np.int32)
    select_neighbours(base, pool_rows[order], pool_scores[order], count, links.shape[1], alpha, metric, vectors,
                      label_offsets, label_values, label_aware, chosen)
    links[slot, :] = chosen


# ---- batch insertion ---------------------------------------------------------------------------------------------

@njit(cache=True)
def _pool_add(p, source_rows, source_scores, count, removed, visited, mark, pool_rows, pool_scores, pool):
    """Append the rows of a search (not p, not removed, not already marked) to the candidate pool."""
    for j in range(count):
        row = source_rows[j]
        if row != p and not removed[row] and visited[row] != mark:
            pool_rows[pool], pool_scores[pool] = row, source_scores[j]
            visited[row] = mark
            pool += 1
    return pool


@njit(cache=True, parallel=True)
def link_batch(vectors, links, slot_of, new_rows, entries, width, select, alpha, metric, removed, label_offsets,
               label_values, filtered, label_aware, pool_expanded, unfiltered_entry, chunk):
    """Insert (or, for rows already linked, re-link) `new_rows` into one layer; returns the nearest row found for
    each (int32 [b], HNSW's entry into the next layer down; -1 when none).

    Phase 1 (parallel, reads only): each new row p searches from entries[i] with a beam of `width` (filtered: only
    through rows sharing one of p's labels; then, when unfiltered_entry >= 0, a second search through every row
    from there), and prunes the candidates (the beams, or the expanded rows when pool_expanded, plus p's current
    list) to `select` forward neighbours. Phase 2: the forward lists are written. Phase 3 (parallel over targets):
    each target q of a forward edge p -> q gets p in its list, pruned back to the degree bound (links.shape[1]) when
    it overflows. Every write has one owner: no locks, and the graph does not depend on the number of threads."""
    num_new, degree = new_rows.shape[0], links.shape[1]
    forward = np.full((num_new, degree), -1, np.int32)
    nearest = np.full(num_new, -1, np.int32)
    searches = 2 if filtered and unfiltered_entry >= 0 else 1
    pool_size = (3 * width if pool_expanded else width) * searches + degree
    for c in prange(-(-num_new // chunk)):
        visited = np.zeros(vectors.shape[0], np.int32)
        rows, scores, done = np.empty(width, np.int32), np.empty(width, np.float32), np.empty(width, np.bool_)
        expanded = np.empty(3 * width if pool_expanded else 0, np.int32)
        expanded_scores = np.empty(expanded.shape[0], np.float32)
        pool_rows, pool_scores = np.empty(pool_size, np.int32), np.empty(pool_size, np.float32)
        unfiltered_entries = np.full(1, unfiltered_entry, np.int32)
        for i in range(c * chunk, min((c + 1) * chunk, num_new)):
            p = new_rows[i]
            stamp = 3 * (i - c * chunk) + 1  # the searches' stamps, then stamp + 2: already in the pool
            mark, pool = stamp + 2, 0
            for search in range(searches):
                labeled = filtered and search == 0
                wanted = label_values[label_offsets[p]:label_offsets[p + 1]] if labeled else label_values[:0]
                count, num_expanded = beam_search(vectors[p], vectors, links, slot_of,
                                                  entries[i] if search == 0 else unfiltered_entries, width, metric,
                                                  label_offsets, label_values, wanted, labeled, visited,
                                                  stamp + search, rows, scores, done, expanded, expanded_scores)
                for j in range(count):
                    if search == 0 and rows[j] != p and not removed[rows[j]]:
                        nearest[i] = rows[j]
                        break
                if pool_expanded:
                    pool = _pool_add(p, expanded, expanded_scores, num_expanded, removed, visited, mark, pool_rows,
                                     pool_scores, pool)
                else:
                    pool = _pool_add(p, rows, scores, count, removed, visited, mark, pool_rows, pool_scores, pool)
            slot = slot_of[p]
            for j in range(degree):  # p's current list (a re-link keeps what it had as candidates)
                row = links[slot, j]
                if row < 0:
                    break
                if visited[row] != mark and row != p and not removed[row]:
                    pool_rows[pool], pool_scores[pool] = row, score(vectors[p], vectors[row], metric)
                    visited[row] = mark
                    pool += 1
            order = np.argsort(-pool_scores[:pool], kind="mergesort")
            select_neighbours(p, pool_rows[:pool][order], pool_scores[:pool][order], pool, select, alpha, metric,
                              vectors, label_offsets, label_values, label_aware, forward[i])
    for i in prange(num_new):
        links[slot_of[new_rows[i]], :] = forward[i]
    _merge_reverse_links(vectors, links, slot_of, new_rows, forward, alpha, metric, label_offsets, label_values,
                         label_aware)
    return nearest


@njit(cache=True, parallel=True)
def _merge_reverse_links(vectors, links, slot_of, new_rows, forward, alpha, metric, label_offsets, label_values,
                         label_aware):
    """Add p to the list of every q in p's forward list (grouped by q: one thread owns each q)."""
    num_new, degree = forward.shape
    total = 0
    for i in range(num_new):
        for j in range(degree):
            total += forward[i, j] >= 0
    targets, sources = np.empty(total, np.int32), np.empty(total, np.int32)
    total = 0
    for i in range(num_new):
        for j in range(degree):
            if forward[i, j] >= 0:
                targets[total], sources[total] = forward[i, j], new_rows[i]
                total += 1
    if total == 0:
        return
    order = np.argsort(targets, kind="mergesort")
    targets, sources = targets[order], sources[order]
    bounds = np.empty(total + 1, np.int64)  # group g: targets[bounds[g]:bounds[g + 1]], one target each
    groups = 0
    for t in range(total):
        if t == 0 or targets[t] != targets[t - 1]:
            bounds[groups] = t
            groups += 1
    bounds[groups] = total
    bounds = bounds[:groups + 1]
    for g in prange(bounds.shape[0] - 1):
        q = targets[bounds[g]]
        slot = slot_of[q]
        pool = np.empty(degree + bounds[g + 1] - bounds[g], np.int32)
        count = 0
        for j in range(degree):
            if links[slot, j] < 0:
                break
            pool[count] = links[slot, j]
            count += 1
        held = count
        for t in range(bounds[g], bounds[g + 1]):
            present = False
            for j in range(held):
                present = present or pool[j] == sources[t]
            if not present:
                pool[count] = sources[t]
                count += 1
        if count <= degree:
            links[slot, :count] = pool[:count]
        else:
            _prune_into(q, pool, count, links, slot, alpha, metric, vectors, label_offsets, label_values, label_aware)


# ---- repair after removal ----------------------------------------------------------------------------------------

@njit(cache=True, parallel=True)
def repair_removed(vectors, links, slot_of, layer_rows, removed, alpha, metric, label_offsets, label_values,
                   label_aware):
    """Reconnect the live rows of one layer (layer_rows) that point to removed rows: the new list is the prune of
    their live neighbours and their removed neighbours' live neighbours; removed rows lose their lists."""
    degree = links.shape[1]
    affected = np.zeros(layer_rows.shape[0], np.bool_)
    for i in prange(layer_rows.shape[0]):
        p = layer_rows[i]
        if not removed[p]:
            for j in range(degree):
                row = links[slot_of[p], j]
                if row < 0:
                    break
                if removed[row]:
                    affected[i] = True
                    break
    todo = layer_rows[affected]
    repaired = np.full((todo.shape[0], degree), -1, np.int32)
    for i in prange(todo.shape[0]):
        p = todo[i]
        pool = np.empty(degree * (degree + 1), np.int32)
        count = 0
        for j in range(degree):
            row = links[slot_of[p], j]
            if row < 0:
                break
            if not removed[row]:
                count = _add_unique(pool, count, row)
            else:
                for h in range(degree):
                    second = links[slot_of[row], h]
                    if second < 0:
                        break
                    if second != p and not removed[second]:
                        count = _add_unique(pool, count, second)
        scratch = np.full((1, degree), -1, np.int32)
        _prune_into(p, pool, count, scratch, 0, alpha, metric, vectors, label_offsets, label_values, label_aware)
        repaired[i] = scratch[0]
    for i in prange(todo.shape[0]):
        links[slot_of[todo[i]], :] = repaired[i]
    for i in prange(layer_rows.shape[0]):
        if removed[layer_rows[i]]:
            links[slot_of[layer_rows[i]], :] = -1
    return todo.shape[0]


@njit(cache=True)
def _add_unique(pool, count, row):
    for j in range(count):
        if pool[j] == row:
            return count
    pool[count] = row
    return count + 1


@njit(cache=True)
def _reached_from(links, slot_of, entry, removed):
    """bool [rows]: live rows reached from `entry` following the lists of one layer (breadth first)."""
    reached = np.zeros(removed.shape[0], np.bool_)
    queue = np.empty(removed.shape[0], np.int32)
    reached[entry], queue[0], head, tail = True, entry, 0, 1
    while head < tail:
        node = queue[head]
        head += 1
        for j in range(links.shape[1]):
            neighbour = links[slot_of[node], j]
            if neighbour < 0:
                break
            if not reached[neighbour] and not removed[neighbour]:
                reached[neighbour] = True
                queue[tail] = neighbour
                tail += 1
    return reached


@njit(cache=True)
def _attach(links, slot_of, parent, child, in_degree):
    """Give `child` an in-edge from `parent`: into a free place, else instead of the parent's neighbour with the
    most in-edges (it keeps others)."""
    slot, victim, most = slot_of[parent], -1, 1
    for j in range(links.shape[1]):
        neighbour = links[slot, j]
        if neighbour < 0:
            links[slot, j] = child
            in_degree[child] += 1
            return
        if neighbour == child:
            return
        if in_degree[neighbour] > most:
            victim, most = j, in_degree[neighbour]
    if victim >= 0:
        in_degree[links[slot, victim]] -= 1
        links[slot, victim] = child
        in_degree[child] += 1


@njit(cache=True)
def connect_unreachable(links, slot_of, layer_rows, entry, removed):
    """Make every live row of a layer reachable from `entry`, so no row is lost to search.

    The heuristic prune can leave a row without in-edges (its reverse links pruned away), as in hnswlib. Each
    unreachable row gets an in-edge from its nearest out-neighbour that is reached (or, when none is, from the
    entry point), and this repeats until everything is reached. Returns the number of edges added."""
    in_degree = np.zeros(removed.shape[0], np.int64)
    for p in layer_rows:
        for j in range(links.shape[1]):
            if links[slot_of[p], j] < 0:
                break
            in_degree[links[slot_of[p], j]] += 1
    added = 0
    for _ in range(1000):  # a bound for safety: each round reaches at least one more row
        reached = _reached_from(links, slot_of, entry, removed)
        progress, first_lost = False, -1
        for p in layer_rows:
            if reached[p] or removed[p]:
                continue
            if first_lost < 0:
                first_lost = p
            for j in range(links.shape[1]):
                neighbour = links[slot_of[p], j]
                if neighbour < 0:
                    break
                if reached[neighbour]:
                    _attach(links, slot_of, neighbour, p, in_degree)
                    progress, added = True, added + 1
                    break
        if first_lost < 0:
            return added
        if not progress:
            _attach(links, slot_of, entry, first_lost, in_degree)
            added += 1
    return added


# ---- plain NumPy helpers shared by the indexes -------------------------------------------------------------------

NO_LABELS = (np.zeros(1, np.int64), np.zeros(0, np.int64))  # a label CSR for kernels that never read labels


def filter_sets(labels: np.ndarray | None, num_queries: int) -> tuple[np.ndarray, np.ndarray]:
    """The per-query filter sets as CSR (offsets int64 [q + 1], values int64): one label each, or none."""
    if labels is None:
        return np.zeros(num_queries + 1, np.int64), np.zeros(0, np.int64)
    return np.arange(num_queries + 1, dtype=np.int64), np.ascontiguousarray(labels, np.int64)


def compact_labels(label_offsets: np.ndarray, label_values: np.ndarray, keep: np.ndarray):
    """The label CSR of the rows `keep` (bool [rows]) only: (offsets, values)."""
    counts = np.diff(label_offsets)
    owners = np.repeat(np.arange(len(keep)), counts)
    offsets = np.zeros(int(keep.sum()) + 1, np.int64)
    offsets[1:] = np.cumsum(counts[keep])
    return offsets, label_values[keep[owners]]


def batch_size(graph_size: int, remaining: int, fraction: float = 0.02, max_batch: int = 8192) -> int:
    """Prefix-doubling batches for parallel insertion: a batch is `fraction` of the graph built so far (at least one
    row). A new row misses only the true neighbours inside its own batch (few while batches are a small fraction of
    the graph; later rows link to it anyway), and batches are large enough to keep every thread busy."""
    return int(min(max(1, fraction * graph_size), max_batch, remaining))


def chunk_size(n: int) -> int:
    """Rows per prange chunk: a few chunks per thread (load balance), one visited array per chunk."""
    return max(1, -(-n // (4 * numba.get_num_threads())))


def check_int(name: str, value, low: int, high: int | None = None) -> int:
    """An integer parameter in [low, high], or one RetrievalError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or (
            high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise RetrievalError(f"{name}={value!r}: expected an integer {bound}")
    return int(value)


def search_options(kind: str, options: dict, beam: str, default: int, k: int, others: tuple = ()) -> int:
    """The beam size (option `beam`, e.g. HNSW's ef, Vamana's L) of a graph search: max(default, k) when not given;
    an unknown option, or a beam that cannot hold k results, is one RetrievalError."""
    unknown = set(options) - {beam, *others}
    if unknown:
        raise RetrievalError(f"search: unknown option {sorted(unknown)[0]!r} for {kind} (options: "
                             f"{', '.join([beam, *others])})")
    size = options.get(beam)
    if size is None:
        return max(default, k)
    if check_int(beam, size, 1) < k:
        raise RetrievalError(f"{beam}={size} is smaller than k={k}: the search list must hold k results (raise {beam})")
    return int(size)


def check_threads(threads) -> int | None:
    return None if threads is None else check_int("threads", threads, 1)
