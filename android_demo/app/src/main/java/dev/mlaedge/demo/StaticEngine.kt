// The static protocol's host side, the twin of mla_edge/runtime/static.py: fixed-capacity latent buffers owned here,
// the additive mask over their valid slots, and the write rule. The graphs return only the new rows; this class
// writes them at the write index. No name or shape is typed here: all come from the manifest. Nothing here touches
// onnxruntime: a GraphRunner runs the graphs over the buffers bound once, so a decode step allocates nothing and
// copies only the new rows.
package dev.mlaedge.demo

class CapacityException(message: String) : IllegalStateException(message)

/** attn_bias (1, seq, capacity + seq): filled slots [0, length) and, for new token q < valid, new tokens 0..q are
 *  open (0); everything else is maskValue. Padded queries (q >= valid) see the filled slots only. The reference
 *  form; the engine keeps one bias per graph and changes only what moved (see Bound.writeBias). */
fun staticBias(length: Int, valid: Int, seq: Int, capacity: Int, maskValue: Float): FloatArray {
    val width = capacity + seq
    val bias = FloatArray(seq * width) { maskValue }
    for (q in 0 until seq) {
        for (j in 0 until length) bias[q * width + j] = 0f
        for (k in 0 until seq) if (k <= q && k < valid) bias[q * width + capacity + k] = 0f
    }
    return bias
}

/** The logits of one token: a row of a graph's logits buffer, valid until the engine's next call. */
class Logits internal constructor(private val tensor: HostTensor, val size: Int) {
    internal var offset = 0

    operator fun get(i: Int): Float = tensor.floats.get(offset + i)

    /** The greedy token: the first of the largest logits (numpy's argmax). */
    fun argmax(): Int {
        var best = 0
        var top = tensor.floats.get(offset)
        for (i in 1 until size) {
            val v = tensor.floats.get(offset + i)
            if (v > top) { top = v; best = i }
        }
        return best
    }
}

/** The manifest's name of a static graph ("decode", "prefill") at a capacity: plain at the largest, "decode-256" at a
 *  smaller one (mla_edge.contract.static_graph_name). */
fun staticGraphName(kind: String, level: Int, top: Int): String = if (level == top) kind else "$kind-$level"

class StaticEngine(val manifest: ExportManifest, val precision: String, private val runner: GraphRunner) : AutoCloseable {
    /** The most tokens the buffers hold: the largest capacity. */
    val capacity = manifest.capacity
    val chunk = manifest.chunk
    private val mask = manifest.maskValue(precision)

    /** One capacity's buffers and graphs. The manifest's capacity rule: the smallest that holds the sequence runs,
     *  so a step costs what that capacity costs; moving up copies the filled slots once. */
    private inner class Level(val n: Int) {
        val names = listOf("decode", "prefill").map { staticGraphName(it, n, capacity) }
        private val bufferSpecs = manifest.graphs.getValue(names[0]).inputs.drop(3) // after ids, positions, bias

        /** The latent buffers, one per layer and kind: (1, n, width), shared by both graphs. */
        val buffers: List<HostTensor> = bufferSpecs.map { HostTensor(it.name, it.shape, it.dtype) }
        val widths = IntArray(buffers.size) { buffers[it].shape[2].toInt() }
        val graphs: Map<String, Bound> = listOf("decode", "prefill").zip(names).associate { (kind, name) ->
            kind to Bound(name, manifest.graphs.getValue(name), this)
        }

        fun check(name: String, spec: GraphSpec) {
            val got = spec.inputs.drop(3).map { it.name }
            require(got == bufferSpecs.map { it.name }) { "graph $name reads buffers $got, decode reads ${bufferSpecs.map { it.name }}" }
        }
    }

    /** One graph's own tensors: ids, positions, its bias (kept between calls) and its outputs. */
    private inner class Bound(val name: String, spec: GraphSpec, level: Level) {
        val seq = spec.seq
        val n = level.n
        val ids = HostTensor(spec.inputs[0].name, spec.inputs[0].shape, spec.inputs[0].dtype)
        val pos = HostTensor(spec.inputs[1].name, spec.inputs[1].shape, spec.inputs[1].dtype)
        val bias = HostTensor(spec.inputs[2].name, spec.inputs[2].shape, spec.inputs[2].dtype)
        val outputs = spec.outputs.map { HostTensor(it.name, it.shape, it.dtype) }
        val vocab = spec.outputs[0].shape[2].toInt()
        val logits = Logits(outputs[0], vocab)
        private var open = 0 // slots [0, open) are 0 in every row of bias

        init {
            level.check(name, spec)
            for (i in 0 until bias.elements) bias.floats.put(i, mask)
            runner.bind(name, listOf(ids, pos, bias) + level.buffers, outputs)
        }

        /** bias := staticBias(length, valid, ...), changing only the slots that moved since the last call. */
        fun writeBias(length: Int, valid: Int) {
            val width = n + seq
            val grow = length >= open
            val from = if (grow) open else length
            val to = if (grow) length else open
            val value = if (grow) 0f else mask
            for (q in 0 until seq) for (j in from until to) bias.floats.put(q * width + j, value)
            open = length
            for (q in 0 until seq) for (k in 0 until seq) {
                bias.floats.put(q * width + n + k, if (k <= q && k < valid) 0f else mask)
            }
        }
    }

    private var level = Level(manifest.capacities.first())

    /** The buffers of the capacity in use. */
    val buffers: List<HostTensor> get() = level.buffers

    /** The capacity in use: the buffers' slots. */
    val levelCapacity: Int get() = level.n

    /** Tokens in the buffers. */
    var length = 0
        private set

    /** Bytes of the buffers in use: what the device holds whatever the length, at this capacity. */
    val cacheBytes: Long get() = level.buffers.sumOf { it.elements * 4L }

    /** To another capacity: its graphs bound, the filled slots copied into its buffers, the old graphs released. */
    private fun moveTo(n: Int) {
        val old = level
        val next = Level(n)
        for (k in next.buffers.indices) {
            val src = old.buffers[k].floats
            val dst = next.buffers[k].floats
            for (i in 0 until length * next.widths[k]) dst.put(i, src.get(i))
        }
        old.names.forEach { runner.release(it) }
        level = next
    }

    fun reset() {
        if (level.n != manifest.capacities.first()) {
            level.names.forEach { runner.release(it) }
            level = Level(manifest.capacities.first())
        } else {
            for (b in level.buffers) for (i in 0 until b.elements) b.floats.put(i, 0f)
        }
        length = 0
    }

    /** Rewinds to an earlier length (slots past it are masked and get overwritten), as the Python session allows. */
    fun rewind(to: Int) {
        require(to in 0..length) { "cannot rewind to $to: the buffers hold $length tokens" }
        length = to
    }

    /** One graph call on ids[from, from + valid); returns the graph, whose logits rows [0, valid) are the new ones. */
    private fun run(kind: String, ids: IntArray, from: Int, valid: Int): Bound {
        if (length + valid > capacity) throw CapacityException("the static cache holds $capacity tokens and is full")
        if (length + valid > level.n) moveTo(manifest.capacities.first { it >= length + valid })
        val g = level.graphs.getValue(kind)
        for (i in 0 until g.seq) {
            g.ids.ints.put(i, if (i < valid) ids[from + i] else 0)
            g.pos.ints.put(i, minOf(length + i, g.n - 1))
        }
        g.writeBias(length, valid)
        runner.run(g.name)
        // The write rule: rows [0, valid) of each new.{i}.{kind} go to slots [length, length + valid).
        for (k in level.buffers.indices) {
            val rows = g.outputs[k + 1].floats
            val dst = level.buffers[k].floats
            val base = length * level.widths[k]
            for (i in 0 until valid * level.widths[k]) dst.put(base + i, rows.get(i))
        }
        length += valid
        return g
    }

    /** Feeds the prompt in prefill chunks (the last one padded at its end); returns the last token's logits. */
    fun prefill(ids: IntArray): Logits {
        if (ids.isEmpty()) throw IllegalArgumentException("the prompt has no tokens")
        if (length + ids.size + 1 > capacity) {
            throw CapacityException("the prompt has ${ids.size} tokens; the static cache holds $capacity (prompt + new tokens)")
        }
        var valid = 0
        var g: Bound? = null
        for (s in ids.indices step chunk) {
            valid = minOf(chunk, ids.size - s)
            g = run("prefill", ids, s, valid)
        }
        g!!.logits.offset = (valid - 1) * g.vocab
        return g.logits
    }

    private val one = IntArray(1)

    fun decode(token: Int): Logits {
        one[0] = token
        val g = run("decode", one, 0, 1)
        g.logits.offset = 0
        return g.logits
    }

    override fun close() = runner.close()
}
