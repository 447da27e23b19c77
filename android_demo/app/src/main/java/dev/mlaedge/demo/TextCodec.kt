// Text <-> token ids with the export's tokenizer graphs (tokenizer.onnx: HfJsonTokenizer over tokenizer.json;
// detokenizer.onnx: BpeDecoder), run by onnxruntime with onnxruntime-extensions' custom ops: no hand-written BPE.
// tests/test_static.py checks in Python that these graphs give the ids of the `tokenizers` library.
package dev.mlaedge.demo

import ai.onnxruntime.OnnxTensor
import ai.onnxruntime.OrtEnvironment
import ai.onnxruntime.OrtSession
import ai.onnxruntime.extensions.OrtxPackage
import java.io.File
import java.nio.LongBuffer

class TextCodec(private val env: OrtEnvironment, manifest: ExportManifest) : Detokenizer, AutoCloseable {
    private fun open(name: String?): OrtSession? = name?.let {
        val opts = OrtSession.SessionOptions()
        opts.registerCustomOpLibrary(OrtxPackage.getLibraryPath())
        env.createSession(File(manifest.folder, it).absolutePath, opts)
    }

    private val encoder = open(manifest.tokenizer)
        ?: throw IllegalStateException("this export has no tokenizer graphs (export with a tokenizer.json)")
    private val decoder = open(manifest.detokenizer)
    private val bos = manifest.bos

    /** The prompt's ids, the model's bos first; an empty or blank prompt is refused in one line. */
    @Suppress("UNCHECKED_CAST")
    fun encode(text: String): IntArray {
        require(text.isNotBlank()) { "the prompt is empty" }
        OnnxTensor.createTensor(env, arrayOf(text), longArrayOf(1)).use { t ->
            encoder.run(mapOf("str" to t)).use { out ->
                val ids = (out.get(0).value as Array<LongArray>)[0].map { it.toInt() }
                return (if (bos != null && ids.firstOrNull() != bos.toInt()) listOf(bos.toInt()) + ids else ids).toIntArray()
            }
        }
    }

    /** TextStream calls this with a few tokens at a time (the new ones plus the last piece's), never the whole text. */
    @Suppress("UNCHECKED_CAST")
    override fun decode(ids: IntArray): String {
        val dec = decoder ?: return ids.joinToString(" ")
        if (ids.isEmpty()) return ""
        val buf = LongBuffer.wrap(LongArray(ids.size) { ids[it].toLong() })
        OnnxTensor.createTensor(env, buf, longArrayOf(ids.size.toLong())).use { t ->
            dec.run(mapOf("ids" to t)).use { out -> return (out.get(0).value as Array<String>)[0] }
        }
    }

    override fun close() {
        encoder.close()
        decoder?.close()
    }
}
