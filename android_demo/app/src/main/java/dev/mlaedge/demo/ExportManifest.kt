// The export folder's manifest (mla_edge.json), the only contract between the exporter and this app: the static
// protocol's names, shapes, capacity, mask value and files. Nothing here is hard-coded; see mla_edge/contract.py.
package dev.mlaedge.demo

import org.json.JSONArray
import org.json.JSONObject
import java.io.File

data class TensorSpec(val name: String, val shape: LongArray, val dtype: String) {
    val elements: Int get() = shape.fold(1L) { a, b -> a * b }.toInt()
}

data class GraphSpec(val seq: Int, val inputs: List<TensorSpec>, val outputs: List<TensorSpec>)

/** One graph file: its path, its ORT-format copy (and the onnxruntime that wrote it), and the QNN context compiled for
 *  a SoC (and the QNN SDK that compiled it), when the export has them. */
data class GraphFile(
    val path: String,
    val ortPath: String?,
    val ortWriter: String?,
    val qnnContext: String?,
    val qnnSoc: String?,
    val qnnSdk: String?,
)

class ExportManifest(val folder: File, json: JSONObject) {
    val formatVersion = json.getInt("format_version")
    private val static: JSONObject = json.optJSONObject("static")
        ?: throw IllegalStateException("$folder has no static protocol: export it with --static-cache N")
    val capacity = static.getInt("capacity")

    /** The buffer sizes whose graphs the export holds, ascending; the last is capacity (exports before capacities:
     *  capacity alone). */
    val capacities: List<Int> = static.optJSONArray("capacities")?.let { a -> (0 until a.length()).map { a.getInt(it) } } ?: listOf(capacity)
    val chunk = static.getInt("chunk")
    private val maskValues = static.optJSONObject("mask_values")
    private val defaultMask = static.getDouble("mask_value").toFloat()

    /** The additive bias of a masked slot for one precision's graphs (-1e4 for float graphs, -50 for QDQ ones);
     *  mask_value for a precision the manifest does not list (manifests written before mask_values). */
    fun maskValue(precision: String): Float =
        if (maskValues != null && maskValues.has(precision)) maskValues.getDouble(precision).toFloat() else defaultMask
    val graphs: Map<String, GraphSpec> = static.getJSONObject("graphs").let { g ->
        g.keys().asSequence().associateWith { graphSpec(g.getJSONObject(it)) }
    }
    val precisions: List<String> = static.getJSONObject("files").keys().asSequence().toList()
    val tokenizer: String? = static.optJSONObject("tokenizer_graphs")?.getJSONObject("tokenizer")?.getString("path")
    val detokenizer: String? = static.optJSONObject("tokenizer_graphs")?.optJSONObject("detokenizer")?.getString("path")
    private val model = json.getJSONObject("model")
    val numLayers = model.getInt("num_hidden_layers")
    val eos: Set<Long> = json.getJSONObject("tokens").optJSONArray("eos")?.let { a -> (0 until a.length()).map { a.getLong(it) }.toSet() } ?: emptySet()
    val bos: Long? = json.getJSONObject("tokens").let { if (it.isNull("bos")) null else it.getLong("bos") }

    /** What an MHA cache of the same attention would hold per token (every head keeps K and V), fp32 bytes. */
    val mhaBytesPerToken: Long = numLayers.toLong() * model.getInt("num_attention_heads") *
        (model.getInt("qk_nope_head_dim") + model.getInt("qk_rope_head_dim") + model.getInt("v_head_dim")) * 4L

    fun files(precision: String): Map<String, GraphFile> {
        val byGraph = static.getJSONObject("files").getJSONObject(precision)
        return byGraph.keys().asSequence().associateWith { name ->
            val e = byGraph.getJSONObject(name)
            val ort = e.optJSONObject("ort")
            val ctx = e.optJSONObject("qnn_context")
            GraphFile(
                e.getString("path"),
                ort?.getString("path"),
                ort?.optString("onnxruntime")?.ifEmpty { null },
                ctx?.getString("path"),
                ctx?.getString("soc"),
                ctx?.optString("qnn_sdk")?.ifEmpty { null },
            )
        }
    }

    companion object {
        const val FILE = "mla_edge.json"
        const val FORMAT_VERSION = 2

        fun read(folder: File): ExportManifest {
            val f = File(folder, FILE)
            require(f.isFile) { "$folder is not an mla-edge export folder: $FILE is missing (adb push the export first)" }
            val json = JSONObject(f.readText())
            require(json.optString("format") == "mla-edge-export") { "$f is not an mla-edge manifest" }
            require(json.getInt("format_version") == FORMAT_VERSION) {
                "$f has format_version ${json.getInt("format_version")}; this app reads $FORMAT_VERSION: export again"
            }
            return ExportManifest(folder, json)
        }

        private fun graphSpec(g: JSONObject) = GraphSpec(g.getInt("seq"), specs(g.getJSONArray("inputs")), specs(g.getJSONArray("outputs")))

        private fun specs(a: JSONArray) = (0 until a.length()).map { i ->
            val o = a.getJSONObject(i)
            val shape = o.getJSONArray("shape")
            TensorSpec(o.getString("name"), LongArray(shape.length()) { shape.getLong(it) }, o.getString("dtype"))
        }
    }
}
