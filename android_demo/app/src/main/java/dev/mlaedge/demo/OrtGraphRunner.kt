// The only file that runs graphs with onnxruntime (TextCodec.kt runs the tokenizer graphs): GraphRunner over
// onnxruntime's Android API. One session per graph, built once per engine; one OnnxTensor per host buffer, created over
// the buffer itself (a direct buffer: onnxruntime reads and writes it in place, no copy) once; outputs written by
// onnxruntime straight into the engine's buffers (pinned outputs). A decode step creates no tensor and copies no cache.
package dev.mlaedge.demo

import ai.onnxruntime.OnnxTensor
import ai.onnxruntime.OrtEnvironment
import ai.onnxruntime.OrtSession
import java.io.File
import java.util.IdentityHashMap

class OrtGraphRunner(
    private val env: OrtEnvironment,
    manifest: ExportManifest,
    precision: String,
    val provider: Provider,
    device: DeviceRuntime,
    threads: Int,
) : GraphRunner {
    /** One line per file that was not the export's first choice (an .ort too new, a QNN context for another SoC). */
    val notes = ArrayList<String>()
    private val sessions: Map<String, OrtSession>
    private val tensors = IdentityHashMap<HostTensor, OnnxTensor>()
    private val feeds = HashMap<String, Map<String, OnnxTensor>>()
    private val pinned = HashMap<String, Map<String, OnnxTensor>>()

    init {
        require(precision in manifest.precisions) { "precision $precision has no static graphs (has ${manifest.precisions})" }
        sessions = manifest.files(precision).mapValues { (_, f) ->
            val choice = chooseFile(f, provider, device)
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
            env.createSession(File(manifest.folder, choice.path).absolutePath, opts)
        }
    }

    private fun tensor(t: HostTensor): OnnxTensor = tensors.getOrPut(t) {
        when (t.dtype) {
            "int32" -> OnnxTensor.createTensor(env, t.ints, t.shape)
            else -> OnnxTensor.createTensor(env, t.floats, t.shape)
        }
    }

    override fun bind(graph: String, inputs: List<HostTensor>, outputs: List<HostTensor>) {
        feeds[graph] = inputs.associate { it.name to tensor(it) }
        pinned[graph] = outputs.associate { it.name to tensor(it) }
    }

    override fun run(graph: String) {
        sessions.getValue(graph).run(feeds.getValue(graph), pinned.getValue(graph)).close()
    }

    override fun close() {
        tensors.values.forEach { it.close() }
        sessions.values.forEach { it.close() }
    }
}
