"""A model of the synchronisation protocol of the warp-specialised forward (csrc/rfbias/sm90/fwd_ws_kernel.h), run
under many random interleavings: mbarrier phases and parity waits, cp.async arrivals that land in any order, the
pingpong named barriers. It fails on a deadlock, on a consumer reading a slot that does not hold its tile, on a copy
landing in a slot still being read, and on unbalanced named-barrier arrivals. Keep it in step with the kernel when
the protocol changes (the producer as one agent with one arrival, each consumer warpgroup as one agent).

    python scripts/model_sm90ws_sync.py
"""
import random

class MBar:
    def __init__(self, count): self.count = count; self.pending = count; self.ph = 0
    def arrive(self, n=1):
        self.pending -= n
        assert self.pending >= 0, "too many arrivals"
        if self.pending == 0: self.ph += 1; self.pending = self.count
    def inc(self, n=1): self.pending += n  # cp.async.mbarrier.arrive (non-noinc): expect one more, async
    def done(self, parity): return (self.ph & 1) != parity

class Named:  # bar.sync / bar.arrive with a thread count (in units of warpgroups here: 2)
    def __init__(self, count): self.count = count; self.arrived = 0; self.gen = 0
    def arrive(self):
        self.arrived += 1
        if self.arrived == self.count: self.arrived = 0; self.gen += 1

def run(n_blocks, S, C, pingpong, doublep, seed):
    rnd = random.Random(seed)
    full = [MBar(1) for _ in range(S)]   # producer WG as one agent: 1 arrival
    empty = [MBar(C) for _ in range(S)]  # each consumer WG as one agent
    query = MBar(1)
    named = [Named(2) for _ in range(C)]
    slot_tile = [None] * S      # tile id whose copies have LANDED in the slot
    inflight = []               # (slot, tile, barrier) copies in flight
    readers = [set() for _ in range(S)]  # consumers currently reading (wgmma in flight or about to) the slot
    log = []

    def land_some():
        # asynchronous landing of copies, in any order
        if inflight and rnd.random() < 0.5:
            i = rnd.randrange(len(inflight)); slot, tile, bar = inflight.pop(i)
            if slot is not None:
                assert not readers[slot], f"copy of tile {tile} lands in slot {slot} while read by {readers[slot]}"
                slot_tile[slot] = tile
            bar.arrive()

    def producer():
        def fill(j):
            slot = j % S
            assert not readers[slot], f"producer writes slot {slot} (tile {j}) while read by {readers[slot]}"
            slot_tile[slot] = None
            full[slot].inc(); inflight.append((slot, j, full[slot])); full[slot].arrive()  # cpasync arrive + arrive
        # query copies, handed over (no scaling path) or after waiting
        scale = rnd.random() < 0.5
        if not scale:
            query.inc(); inflight.append((None, 'q', query)); query.arrive()
        for j in range(S):
            if j < n_blocks: fill(j)
            yield None
        if scale:
            # wait for own query copies: modelled by waiting until no query copy in flight
            while any(t == 'q' for _, t, _ in inflight): yield lambda: not any(t == 'q' for _, t, _ in inflight)
            # (the q copies were issued without an async arrive on `query` in this path)
            query.arrive()
        for j in range(S, n_blocks):
            slot = j % S
            par = ((j // S) - 1) & 1
            yield (lambda s=slot, p=par: empty[s].done(p))
            fill(j)
            yield None

    def consumer(c):
        def wait_full(j):
            s = j % S
            return (lambda: full[s].done((j // S) & 1))
        def use(j):  # reading slot of tile j: must hold tile j
            s = j % S
            assert slot_tile[s] == j, f"consumer {c} reads slot {s} expecting tile {j}, holds {slot_tile[s]}"
            readers[s].add(c)
        def release(j):
            s = j % S
            readers[s].discard(c)
            empty[s].arrive()
        def sched_wait():
            if pingpong:
                g = named[c]
                target = g.gen + 1
                g.arrive()
                return (lambda: g.gen >= target)
            return None
        def sched_pass(last):
            if pingpong and not (last and c == C - 1): named[(c + 1) % C].arrive()

        yield (lambda: query.done(0))
        if pingpong and c == C - 1: named[0].arrive()
        yield wait_full(0)
        if not doublep:
            w = sched_wait()
            if w: yield w
            use(0)  # S(0) reads K(0)
            sched_pass(False)
            for j in range(n_blocks - 1):
                yield wait_full(j + 1)
                w = sched_wait()
                if w: yield w
                use(j + 1)  # S(j+1)
                sched_pass(False)
                yield None  # softmax etc
                release(j)  # after wait<0>: S(j+1)? no: slot j (K(j), V(j)) done
            w = sched_wait()
            if w: yield w
            sched_pass(True)
            yield None
            # slot n-1 never released (not needed)
        else:
            use(0)
            for j in range(n_blocks - 1):
                yield wait_full(j + 1)
                if j > 0: release(j - 1)
                use(j + 1)
                yield None
            # last PV
            yield None
        yield None

    agents = {'P': producer()}
    for c in range(C): agents[f'C{c}'] = consumer(c)
    blocked = {k: None for k in agents}
    steps = 0
    while agents:
        steps += 1
        land_some()
        runnable = [k for k in agents if blocked[k] is None or blocked[k]()]
        if not runnable:
            if inflight: continue
            raise RuntimeError(f"deadlock: n={n_blocks} S={S} C={C} pp={pingpong} dp={doublep} blocked={list(agents)}")
        k = rnd.choice(runnable)
        try:
            cond = next(agents[k])
            blocked[k] = cond
        except StopIteration:
            del agents[k]; del blocked[k]
    while inflight: land_some()
    # named barriers balanced
    for g in named: assert g.arrived == 0, "dangling named-barrier arrivals"

cases = 0
for n in [1, 2, 3, 4, 5, 7, 12]:
    for S in [2, 3, 4]:
        for C in [1, 2, 3]:
            for pp in [False, True]:
                for dp in [False, True]:
                    if pp and dp: continue
                    if dp and S < 3: continue
                    if pp and C == 1: continue
                    for seed in range(60):
                        run(n, S, C, pp, dp, seed); cases += 1
print("ok", cases)
