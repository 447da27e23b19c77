// On a device (./gradlew connectedStandardDebugAndroidTest), with the demo export pushed: the Kotlin engine over
// onnxruntime (OrtGraphRunner) and the tokenizer graphs reproduce the Python reference's greedy trace of the demo
// model token for token. (On the JVM, ReplayTest checks the same engine against every recorded graph call.)
package dev.mlaedge.demo

import ai.onnxruntime.OrtEnvironment
import androidx.test.platform.app.InstrumentationRegistry
import org.json.JSONObject
import org.junit.Assert.assertArrayEquals
import org.junit.Test
import java.io.File

class DemoTraceTest {
    @Test
    fun greedyTraceEqualsPython() {
        val ctx = InstrumentationRegistry.getInstrumentation().targetContext
        val trace = JSONObject(ctx.assets.open("static_protocol.json").bufferedReader().readText()).getJSONObject("demo_trace")
        val manifest = ExportManifest.read(File(ctx.getExternalFilesDir(null), "export"))
        val env = OrtEnvironment.getEnvironment()
        val device = DeviceRuntime(BuildConfig.ONNXRUNTIME_VERSION, null, null)
        TextCodec(env, manifest).use { codec ->
            val ids = codec.encode(trace.getString("prompt"))
            val want = trace.getJSONArray("prompt_ids").let { a -> IntArray(a.length()) { a.getInt(it) } }
            assertArrayEquals(want, ids)
            StaticEngine(manifest, "fp32", OrtGraphRunner(env, manifest, "fp32", Provider.CPU, device, bigCoreCount())).use { engine ->
                var logits = engine.prefill(ids)
                val got = IntArray(32) { logits.argmax().also { t -> logits = engine.decode(t) } }
                val greedy = trace.getJSONArray("greedy_ids").let { a -> IntArray(a.length()) { a.getInt(it) } }
                assertArrayEquals(greedy, got)
            }
        }
    }
}
