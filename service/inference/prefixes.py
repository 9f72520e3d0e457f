"""The prefix cache: the keys and values of prompts already prefilled, found again by their tokens.

A prompt is cut into blocks of BLOCK tokens. A block's key is a digest of its
tokens and of the key of the block before it; the first block's chains from
a root that names the model's files, its numeric mode and its KV cache's
dtype, and the request's scope (settings.prefix_cache_scope). So a key
stands for everything up to its block's end: a block is found only by a
prompt identical up to there, of the same model in the same mode and scope.

A row about to prefill its prompt copies the blocks found for it into its
own cache (`load`: milliseconds, where prefilling them took seconds) and
prefills the rest; as its prefill goes on, each block it completes is copied
in (`store`), so a request that shares a prefix with one still prefilling
waits for those blocks instead of computing them again (service.inference.batching).
The last prompt token is always prefilled: its logits choose the first token.

Blocks are kept in the memory the rows' caches leave free (kvmemory.CacheMemory.hold),
up to the cache's own bound, and evicted least recently used first: a row
that needs the room takes it back (`reclaim`). A block is only read while it
is copied, in the engine's thread, so none is ever evicted while in use. A
prompt's blocks are touched from its last to its first, so a block is always
more recent than those after it: eviction takes a chain's tail before its
head, and every block kept is still reachable from its first.
"""

import hashlib
import logging
import threading
from array import array
from collections import OrderedDict

from service.records import metrics

log = logging.getLogger("vibethinker.engine")

BLOCK = 64  # tokens a block holds: a prompt shares its prefix to within this many tokens


def root_of(revision, scope):
    """The key a prompt's first block chains from."""
    return hashlib.blake2b(f"{revision}\0{scope}".encode(), digest_size=16).digest()


def block_keys(root, ids, blocks):
    """The keys of the first `blocks` whole blocks of `ids`."""
    keys, key = [], root
    for i in range(blocks):
        piece = array("q", ids[i * BLOCK:(i + 1) * BLOCK]).tobytes()
        key = hashlib.blake2b(key + piece, digest_size=16).digest()
        keys.append(key)
    return keys


class PrefixStore:
    """Blocks of prefilled prompts by key, least recently used first, within `bound` bytes and what `memory`
    (the model's kvmemory.CacheMemory) leaves free."""

    block_tokens = BLOCK

    def __init__(self, memory, bound, revision, model="model"):
        self.memory, self.bound, self.revision, self.model = memory, bound, revision, model
        self._blocks = OrderedDict()  # key -> (keys, values): [layer, head, BLOCK, width] each
        self._lock = threading.Lock()  # the engine thread changes it; /metrics reads its size
        self.block_bytes = BLOCK * memory.layout.bytes_per_token
        memory.reclaim = self.reclaim

    def __len__(self):
        return len(self._blocks)

    @property
    def bytes(self):
        return len(self._blocks) * self.block_bytes

    def keys(self, ids, scope=""):
        """The keys of the blocks of prompt `ids` that a row may read instead of prefilling (its last token
        is always prefilled)."""
        return block_keys(root_of(self.revision, scope), ids, (len(ids) - 1) // BLOCK)

    def found(self, keys):
        """How many of `keys`, from the first, are held."""
        count = 0
        while count < len(keys) and keys[count] in self._blocks:
            count += 1
        return count

    def load(self, keys, cache):
        """Copy the held blocks of `keys` (from the first, while they are held) into the start of `cache`, an
        empty row cache; the tokens copied."""
        count = self.found(keys)
        for i in range(count):
            block_keys_, block_values = self._blocks[keys[i]]
            cache.keys[:, :, i * BLOCK:(i + 1) * BLOCK].copy_(block_keys_)
            cache.values[:, :, i * BLOCK:(i + 1) * BLOCK].copy_(block_values)
        self._touch(keys[:count])
        cache.length = count * BLOCK
        return count * BLOCK

    def store(self, keys, cache):
        """Copy the blocks of `keys` that `cache` has complete and the store lacks (one evicted meanwhile
        included) into the store, touching those it holds; how many blocks from the first it now holds. A
        block that finds no room is not stored, nor any after it."""
        end = min(len(keys), cache.length // BLOCK)
        for i in range(end):
            if keys[i] not in self._blocks:
                if not self._room(keys[:i]):
                    end = i
                    break
                try:
                    block = (cache.keys[:, :, i * BLOCK:(i + 1) * BLOCK].clone(),
                             cache.values[:, :, i * BLOCK:(i + 1) * BLOCK].clone())
                except Exception:  # noqa: BLE001 - out of memory on a GPU: not stored, nothing else fails
                    self.memory.unhold(self.block_bytes)
                    log.exception("storing a prefix block failed", extra={"fields": {"model": self.model}})
                    end = i
                    break
                with self._lock:
                    self._blocks[keys[i]] = block
        self._touch(keys[:end])
        return end

    def _touch(self, keys):
        """Make `keys` the most recently used, the first of them last (the most recent of all)."""
        with self._lock:
            for key in reversed(keys):
                self._blocks.move_to_end(key)

    def _room(self, before):
        """Make room for one more block within the bound and in what the rows leave free, evicting the least
        recently used but not the blocks `before` it (touched first); whether there is (its bytes then held)."""
        self._touch(before)
        while True:
            if self.bytes + self.block_bytes <= self.bound and self.memory.hold(self.block_bytes):
                return True
            if len(self._blocks) <= len(before):
                return False
            self._evict()

    def _evict(self):
        with self._lock:
            self._blocks.popitem(last=False)
        self.memory.unhold(self.block_bytes)
        metrics.PREFIX_EVICTIONS.labels(self.model).inc()

    def reclaim(self, nbytes):
        """Evict blocks until `nbytes` are freed, or none is left (a row needs the room)."""
        while nbytes > 0 and self._blocks:
            self._evict()
            nbytes -= self.block_bytes
