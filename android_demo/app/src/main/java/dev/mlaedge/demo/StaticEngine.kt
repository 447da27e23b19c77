// The static protocol's host side, line for line the twin of mla_edge/runtime/static.py: fixed-capacity latent
// buffers owned here, the additive mask over their valid slots, and the write rule. The graphs return only the new
// rows; this class writes them at the write index. No name or shape is typed here: all come from the manifest.
package dev.mlaedge.demo

import ai.onnxruntime.OnnxTensor
import ai.onnxruntime.OrtEnvironment
import ai.onnxruntime.OrtSession
import java.io.File
import java.nio.FloatBuffer
import java.nio.IntBuffer

enum class Provider { CPU, XNNPACK, NNAPI, QNN }

class CapacityException(message: String) : IllegalStateException(message)

/** attn_bias (1, seq, capacity + seq): filled slots [0, length) and, for new token q < valid, new tokens 0..q are
 *  open (0); everything else is maskValue. Padded queries (q >= valid) see the filled slots only. */
fun staticBias(length: Int, valid: Int, seq: Int, capacity: Int, maskValue: Float): FloatArray {
    val width = capacity + seq
    val bias = FloatArray(seq * width) { maskValue }
    for (q in 0 until seq) {
        for (j in 0 until length) bias[q * width + j] = 0f
        for (k in 0 until seq) if (k <= q && k < valid) bias[q * width + capacity + k] = 0f
    }
    return bias
}

class StaticEngine(
    private val env: OrtEnvironment,
    val manifest: ExportManifest,
    val precision: String,
    val provider: Provider,
) : AutoCloseable {
    val capacity = manifest.capacity
    val chunk = manifest.chunk
    private val sessions: Map<String, OrtSession>
    private val inputs = manifest.graphs.getValue("decode").inputs
    private val bufferSpecs = inputs.drop(3) // after input_ids, position_ids, attn_bias
    private val buffers: Map<String, FloatArray> = bufferSpecs.associate { it.name to FloatArray(it.elements) }
    var length = 0
        private set

    init {
        require(precision in manifest.precisions) { "precision $precision has no static graphs (has ${manifest.precisions})" }
        sessions = manifest.files(precision).mapValues { (_, f) ->
            val opts = OrtSession.SessionOptions()
            val path = when (provider) {
                Provider.CPU -> f.ortPath ?: f.path
                Provider.XNNPACK -> { opts.addXnnpack(mapOf("intra_op_num_threads" to "4")); f.ortPath ?: f.path }
                Provider.NNAPI -> { opts.addNnapi(); f.ortPath ?: f.path }
                Provider.QNN -> {
                    // The whole graph on the HTP or nothing: a session that loads runs wholly on the NPU.
                    opts.addConfigEntry("session.disable_cpu_ep_fallback", "1")
                    val qnn = mutableMapOf("backend_path" to "libQnnHtp.so", "htp_performance_mode" to "burst")
                    if (precision == "fp32") qnn["enable_htp_fp16_precision"] = "1"
                    opts.addQnn(qnn)
                    f.qnnContext ?: f.path // compiled once for a SoC by `mla-edge export --qnn-context`
                }
            }
            env.createSession(File(manifest.folder, path).absolutePath, opts)
        }
    }

    /** Bytes of the fixed buffers: what the device holds whatever the length. */
    val cacheBytes: Long get() = buffers.values.sumOf { it.size * 4L }

    fun reset() {
        buffers.values.forEach { it.fill(0f) }
        length = 0
    }

    /** One graph call on up to seq tokens; returns the logits of the valid ones. */
    @Suppress("UNCHECKED_CAST")
    private fun run(graph: String, ids: IntArray): Array<FloatArray> {
        val spec = manifest.graphs.getValue(graph)
        val seq = spec.seq
        val valid = ids.size
        if (length + valid > capacity) throw CapacityException("the static cache holds $capacity tokens and is full")
        val idBuf = IntArray(seq).also { ids.copyInto(it) }
        val pos = IntArray(seq) { minOf(length + it, capacity - 1) }
        val feeds = LinkedHashMap<String, OnnxTensor>()
        feeds[spec.inputs[0].name] = OnnxTensor.createTensor(env, IntBuffer.wrap(idBuf), spec.inputs[0].shape)
        feeds[spec.inputs[1].name] = OnnxTensor.createTensor(env, IntBuffer.wrap(pos), spec.inputs[1].shape)
        val bias = staticBias(length, valid, seq, capacity, manifest.maskValue)
        feeds[spec.inputs[2].name] = OnnxTensor.createTensor(env, FloatBuffer.wrap(bias), spec.inputs[2].shape)
        for (b in bufferSpecs) feeds[b.name] = OnnxTensor.createTensor(env, FloatBuffer.wrap(buffers.getValue(b.name)), b.shape)
        try {
            sessions.getValue(graph).run(feeds).use { out ->
                // The write rule: rows [0, valid) of each new.{i}.{kind} go to slots [length, length + valid).
                for ((k, b) in bufferSpecs.withIndex()) {
                    val rows = out.get(k + 1).value as Array<Array<FloatArray>> // (1, seq, width)
                    val width = b.shape[2].toInt()
                    val dst = buffers.getValue(b.name)
                    for (r in 0 until valid) rows[0][r].copyInto(dst, (length + r) * width)
                }
                length += valid
                val logits = out.get(0).value as Array<Array<FloatArray>> // (1, seq, vocab)
                return Array(valid) { logits[0][it] }
            }
        } finally {
            feeds.values.forEach { it.close() }
        }
    }

    /** Feeds the prompt in prefill chunks (the last one padded at its end); returns the last token's logits. */
    fun prefill(ids: IntArray): FloatArray {
        if (length + ids.size + 1 > capacity) {
            throw CapacityException("the prompt has ${ids.size} tokens; the static cache holds $capacity (prompt + new tokens)")
        }
        var last = FloatArray(0)
        for (s in ids.indices step chunk) last = run("prefill", ids.copyOfRange(s, minOf(s + chunk, ids.size))).last()
        return last
    }

    fun decode(token: Int): FloatArray = run("decode", intArrayOf(token))[0]

    override fun close() = sessions.values.forEach { it.close() }
}
