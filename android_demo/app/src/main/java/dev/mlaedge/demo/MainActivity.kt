// The demo screen: pick a provider and precision, type a prompt, and watch text stream with tok/s, the latent
// cache's bytes against what an MHA cache would hold, and the app's memory. The export folder is pushed with
//   adb push OUT_DIR /sdcard/Android/data/dev.mlaedge.demo/files/export
package dev.mlaedge.demo

import ai.onnxruntime.OrtEnvironment
import android.app.Activity
import android.os.Bundle
import android.os.Debug
import android.widget.ArrayAdapter
import android.widget.Button
import android.widget.EditText
import android.widget.Spinner
import android.widget.TextView
import java.io.File
import java.util.concurrent.Executors

class MainActivity : Activity() {
    private val worker = Executors.newSingleThreadExecutor()
    private val env: OrtEnvironment by lazy { OrtEnvironment.getEnvironment() }

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContentView(R.layout.activity_main)
        val exportDir = File(getExternalFilesDir(null), "export")
        val providers = findViewById<Spinner>(R.id.provider)
        val precisions = findViewById<Spinner>(R.id.precision)
        val output = findViewById<TextView>(R.id.output)
        val stats = findViewById<TextView>(R.id.stats)
        val manifest = try {
            ExportManifest.read(exportDir)
        } catch (e: Exception) {
            output.text = e.message
            return
        }
        providers.adapter = ArrayAdapter(this, android.R.layout.simple_spinner_dropdown_item, Provider.values().map { it.name })
        precisions.adapter = ArrayAdapter(this, android.R.layout.simple_spinner_dropdown_item, manifest.precisions)
        findViewById<Button>(R.id.run).setOnClickListener {
            val prompt = findViewById<EditText>(R.id.prompt).text.toString()
            val provider = Provider.valueOf(providers.selectedItem as String)
            val precision = precisions.selectedItem as String
            output.text = prompt
            worker.execute { generate(manifest, provider, precision, prompt, 128, output, stats) }
        }
    }

    private fun generate(m: ExportManifest, provider: Provider, precision: String, prompt: String, maxNew: Int,
                         output: TextView, stats: TextView) {
        try {
            StaticEngine(env, m, precision, provider).use { engine ->
                TextCodec(env, m).use { codec ->
                    val t0 = System.nanoTime()
                    var logits = engine.prefill(codec.encode(prompt))
                    val t1 = System.nanoTime()
                    val out = ArrayList<Int>()
                    var shown = ""
                    while (out.size < maxNew && engine.length < engine.capacity) {
                        val next = logits.indices.maxByOrNull { logits[it] }!! // greedy
                        if (next.toLong() in m.eos) break
                        out.add(next)
                        val text = codec.decode(out.toIntArray())
                        if (!text.endsWith("\uFFFD") && text.length > shown.length) { // whole characters only
                            val piece = text.substring(shown.length)
                            shown = text
                            runOnUiThread { output.append(piece) }
                        }
                        logits = engine.decode(next)
                    }
                    val t2 = System.nanoTime()
                    val decodeRate = out.size / ((t2 - t1) / 1e9)
                    val mha = m.mhaBytesPerToken * engine.length
                    val pss = Debug.getPss() / 1024.0
                    runOnUiThread {
                        stats.text = "%s %s | prefill %.0f ms | decode %.1f tok/s | latent buffer %.1f KiB for %d slots (%d used; MHA would hold %.1f KiB for them) | app PSS %.0f MiB"
                            .format(provider, precision, (t1 - t0) / 1e6, decodeRate, engine.cacheBytes / 1024.0, engine.capacity,
                                engine.length, mha / 1024.0, pss)
                    }
                }
            }
        } catch (e: Exception) {
            runOnUiThread { stats.text = "error: ${e.message}" }
        }
    }
}
