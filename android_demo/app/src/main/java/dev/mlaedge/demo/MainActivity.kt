// The demo screen: pick a provider and precision, type a prompt, and watch text stream with tok/s, the latent
// cache's bytes against what an MHA cache would hold, and the app's memory. The export folder is pushed with
//   adb push OUT_DIR /sdcard/Android/data/dev.mlaedge.demo/files/export
// (both flavors share that application id, so the folder is the same). Sessions are built once per provider and
// precision and kept between taps; the engine's buffers are reused (reset, not reallocated).
package dev.mlaedge.demo

import ai.onnxruntime.OrtEnvironment
import android.app.Activity
import android.os.Build
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
    private var engine: Pair<String, StaticEngine>? = null // (provider/precision, engine), used on the worker only
    private var codec: TextCodec? = null
    private val device by lazy {
        val soc = if (Build.VERSION.SDK_INT >= 31) Build.SOC_MODEL.lowercase() else null
        DeviceRuntime(BuildConfig.ONNXRUNTIME_VERSION, BuildConfig.QNN_SDK_VERSION.ifEmpty { null }, soc)
    }

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
        val offered = if (BuildConfig.FLAVOR == "qnn") Provider.values().toList() else Provider.values().filter { it != Provider.QNN }
        providers.adapter = ArrayAdapter(this, android.R.layout.simple_spinner_dropdown_item, offered.map { it.name })
        precisions.adapter = ArrayAdapter(this, android.R.layout.simple_spinner_dropdown_item, manifest.precisions)
        findViewById<Button>(R.id.run).setOnClickListener {
            val prompt = findViewById<EditText>(R.id.prompt).text.toString()
            if (prompt.isBlank()) {
                stats.text = "type a prompt first"
                return@setOnClickListener
            }
            val provider = Provider.valueOf(providers.selectedItem as String)
            val precision = precisions.selectedItem as String
            output.text = prompt
            worker.execute { run(manifest, provider, precision, prompt, 128, output, stats) }
        }
    }

    /** The engine for this provider and precision, built on first use and kept (the previous one is closed). */
    private fun engineFor(m: ExportManifest, provider: Provider, precision: String, stats: TextView): StaticEngine {
        val key = "$provider/$precision"
        engine?.let { (k, e) -> if (k == key) return e else e.close() }
        val runner = OrtGraphRunner(env, m, precision, provider, device, bigCoreCount())
        return StaticEngine(m, precision, runner).also { engine = key to it } // binds the smallest capacity's graphs
            .also { runner.notes.forEach { note -> runOnUiThread { stats.append("\n$note") } } }
    }

    private fun run(m: ExportManifest, provider: Provider, precision: String, prompt: String, maxNew: Int,
                    output: TextView, stats: TextView) {
        try {
            runOnUiThread { stats.text = "" }
            val engine = engineFor(m, provider, precision, stats)
            val codec = codec ?: TextCodec(env, m).also { codec = it }
            val ids = codec.encode(prompt)
            val r = generate(engine, ids, maxNew, m.eos, codec) { piece -> runOnUiThread { output.append(piece) } }
            val decodeRate = (r.tokens.size - 1).coerceAtLeast(0) / (r.decodeNanos / 1e9)
            val mha = m.mhaBytesPerToken * engine.length
            val pss = Debug.getPss() / 1024.0
            runOnUiThread {
                stats.append(
                    "%s %s | prefill %.0f ms | decode %.1f tok/s | latent buffer %.1f KiB for %d slots (%d used; MHA would hold %.1f KiB for them) | app PSS %.0f MiB"
                        .format(provider, precision, r.prefillNanos / 1e6, decodeRate, engine.cacheBytes / 1024.0,
                            engine.levelCapacity, engine.length, mha / 1024.0, pss)
                )
            }
        } catch (e: Exception) {
            runOnUiThread { stats.text = "error: ${e.message}" }
        }
    }

    override fun onDestroy() {
        worker.execute {
            engine?.second?.close()
            codec?.close()
        }
        worker.shutdown()
        super.onDestroy()
    }
}
