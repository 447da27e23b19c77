// The only file that runs graphs with onnxruntime (TextCodec.kt runs the tokenizer graphs): GraphRunner over
// onnxruntime's Android API. One session per graph, built when the engine binds it and closed when the engine moves
// to another capacity (one capacity's graphs at a time); one OnnxTensor per host buffer, created over the buffer
// itself (a direct buffer: onnxruntime reads and writes it in place, no copy) once; outputs written by onnxruntime
// straight into the engine's buffers (pinned outputs). A decode step creates no tensor and copies no cache.
package dev.mlaedge.demo

import ai.onnxruntime.OnnxTensor
import ai.onnxruntime.OrtEnvironment
import ai.onnxruntime.OrtSession
import java.io.File
import java.util.IdentityHashMap

class OrtGraphRunner(
    private val env: OrtEnvironment,
    private val manifest: ExportManifest,
    private val precision: String,
    val provider: Provider,
    private val device: DeviceRuntime,
    private val threads: Int,
) : GraphRunner {
    /** One line per file that was not the export's first choice (an .ort too new, a QNN context for another SoC). */
    val notes = ArrayList<String>()
    private val files: Map<String, GraphFile>
    private val sessions = HashMap<String, OrtSession>() // the graphs bound now: one capacity's, built when bound
    private val tensors = IdentityHashMap<HostTensor, OnnxTensor>()
    private val feeds = HashMap<String, Map<String, OnnxTensor>>()
    private val pinned = HashMap<String, Map<String, OnnxTensor>>()

    init {
        require(precision in manifest.precisions) { "precision $precision has no static graphs (has ${manifest.precisions})" }
        files = manifest.files(precision)
    }

    private fun session(graph: String): OrtSession {
        val choice = chooseFile(files.getValue(graph), provider, device)
        choice.note?.let { notes.add(it) }
        val opts = OrtSession.SessionOptions()
        when (provider) {
            Provider.CPU -> opts.setIntraOpNumThreads(threads)
            Provider.XNNPACK -> { // XNNPACK's own pool does the work; onnxruntime's stays at one thread
                opts.setIntraOpNumThreads(1)
                opts.addXnnpack(mapOf("intra_op_num_threads" to threads.toString()))
            }
            Provider.NNAPI -> { opts.setIntraOpNumThreads(threads); opts.addNnapi() }
            Provider.QNN -> {
                // The whole graph on the HTP or nothing: a session that loads runs wholly on the NPU.
                opts.addConfigEntry("session.disable_cpu_ep_fallback", "1")
                val qnn = mutableMapOf("backend_path" to "libQnnHtp.so", "htp_performance_mode" to "burst")
                if (precision == "fp32") qnn["enable_htp_fp16_precision"] = "1"
                opts.addQnn(qnn)
            }
        }
        return env.createSession(File(manifest.folder, choice.path).absolutePath, opts)
    }

    private fun tensor(t: HostTensor): OnnxTensor = tensors.getOrPut(t) {
        when (t.dtype) {
            "int32" -> OnnxTensor.createTensor(env, t.ints, t.shape)
            else -> OnnxTensor.createTensor(env, t.floats, t.shape)
        }
    }

    override fun bind(graph: String, inputs: List<HostTensor>, outputs: List<HostTensor>) {
        if (graph !in sessions) sessions[graph] = session(graph)
        feeds[graph] = inputs.associate { it.name to tensor(it) }
        pinned[graph] = outputs.associate { it.name to tensor(it) }
    }

    override fun run(graph: String) {
        sessions.getValue(graph).run(feeds.getValue(graph), pinned.getValue(graph)).close()
    }

    /** The engine moved to another capacity: this graph's session and the tensors no bound graph uses are closed. */
    override fun release(graph: String) {
        sessions.remove(graph)?.close()
        feeds.remove(graph)
        pinned.remove(graph)
        val used = (feeds.values + pinned.values).flatMap { it.values }.toSet()
        val stale = tensors.entries.filter { it.value !in used }
        for (e in stale) { e.value.close(); tensors.remove(e.key) }
    }

    override fun close() {
        tensors.values.forEach { it.close() }
        sessions.values.forEach { it.close() }
    }
}
