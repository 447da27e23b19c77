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

class StaticEngine(val manifest: ExportManifest, val precision: String, private val runner: GraphRunner) : AutoCloseable {
    val capacity = manifest.capacity
    val chunk = manifest.chunk
    private val mask = manifest.maskValue(precision)
    private val bufferSpecs = manifest.graphs.getValue("decode").inputs.drop(3) // after input_ids, position_ids, attn_bias

    /** The latent buffers, one per layer and kind: (1, capacity, width), shared by both graphs. */
    val buffers: List<HostTensor> = bufferSpecs.map { HostTensor(it.name, it.shape, it.dtype) }
    private val widths = IntArray(buffers.size) { buffers[it].shape[2].toInt() }

    /** One graph's own tensors: ids, positions, its bias (kept between calls) and its outputs. */
    private inner class Bound(name: String, spec: GraphSpec) {
        val seq = spec.seq
        val ids = HostTensor(spec.inputs[0].name, spec.inputs[0].shape, spec.inputs[0].dtype)
        val pos = HostTensor(spec.inputs[1].name, spec.inputs[1].shape, spec.inputs[1].dtype)
        val bias = HostTensor(spec.inputs[2].name, spec.inputs[2].shape, spec.inputs[2].dtype)
        val outputs = spec.outputs.map { HostTensor(it.name, it.shape, it.dtype) }
        val vocab = spec.outputs[0].shape[2].toInt()
        val logits = Logits(outputs[0], vocab)
        private var open = 0 // slots [0, open) are 0 in every row of bias

        init {
            val names = spec.inputs.drop(3).map { it.name }
            require(names == bufferSpecs.map { it.name }) { "graph $name reads buffers $names, decode reads ${bufferSpecs.map { it.name }}" }
            for (i in 0 until bias.elements) bias.floats.put(i, mask)
            runner.bind(name, listOf(ids, pos, bias) + buffers, outputs)
        }

        /** bias := staticBias(length, valid, ...), changing only the slots that moved since the last call. */
        fun writeBias(length: Int, valid: Int) {
            val width = capacity + seq
            val grow = length >= open
            val from = if (grow) open else length
            val to = if (grow) length else open
            val value = if (grow) 0f else mask
            for (q in 0 until seq) for (j in from until to) bias.floats.put(q * width + j, value)
            open = length
            for (q in 0 until seq) for (k in 0 until seq) {
                bias.floats.put(q * width + capacity + k, if (k <= q && k < valid) 0f else mask)
            }
        }
    }

    private val graphs: Map<String, Bound> = listOf("decode", "prefill").associateWith { Bound(it, manifest.graphs.getValue(it)) }

    /** Tokens in the buffers. */
    var length = 0
        private set

    /** Bytes of the fixed buffers: what the device holds whatever the length. */
    val cacheBytes: Long = buffers.sumOf { it.elements * 4L }

    fun reset() {
        for (b in buffers) for (i in 0 until b.elements) b.floats.put(i, 0f)
        length = 0
    }

    /** Rewinds to an earlier length (slots past it are masked and get overwritten), as the Python session allows. */
    fun rewind(to: Int) {
        require(to in 0..length) { "cannot rewind to $to: the buffers hold $length tokens" }
        length = to
    }

    /** One graph call on ids[from, from + valid); returns the graph, whose logits rows [0, valid) are the new ones. */
    private fun run(graph: String, ids: IntArray, from: Int, valid: Int): Bound {
        if (length + valid > capacity) throw CapacityException("the static cache holds $capacity tokens and is full")
        val g = graphs.getValue(graph)
        for (i in 0 until g.seq) {
            g.ids.ints.put(i, if (i < valid) ids[from + i] else 0)
            g.pos.ints.put(i, minOf(length + i, capacity - 1))
        }
        g.writeBias(length, valid)
        runner.run(graph)
        // The write rule: rows [0, valid) of each new.{i}.{kind} go to slots [length, length + valid).
        for (k in buffers.indices) {
            val rows = g.outputs[k + 1].floats
            val dst = buffers[k].floats
            val base = length * widths[k]
            for (i in 0 until valid * widths[k]) dst.put(base + i, rows.get(i))
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
        val g = graphs.getValue("prefill")
        var valid = 0
        for (s in ids.indices step chunk) {
            valid = minOf(chunk, ids.size - s)
            run("prefill", ids, s, valid)
        }
        g.logits.offset = (valid - 1) * g.vocab
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
