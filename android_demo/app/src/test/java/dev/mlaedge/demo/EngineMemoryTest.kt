// Hold the cache once: the engine's buffers are bound once and a decode step allocates nothing on the heap and writes
// only the new rows, at capacity 256 and 4096 alike (a per-step copy or allocation of the cache would grow 16x).
package dev.mlaedge.demo

import org.json.JSONArray
import org.json.JSONObject
import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Test
import java.io.File
import java.lang.management.ManagementFactory

/** A manifest with the static protocol's names and shapes for a small model and any capacity. */
fun syntheticManifest(capacity: Int, chunk: Int = 8, layers: Int = 2, width: Int = 24, vocab: Int = 50): ExportManifest {
    fun spec(name: String, shape: List<Int>, dtype: String) = JSONObject().put("name", name).put("shape", JSONArray(shape)).put("dtype", dtype)
    fun graph(seq: Int): JSONObject {
        val inputs = JSONArray().put(spec("input_ids", listOf(1, seq), "int32")).put(spec("position_ids", listOf(1, seq), "int32"))
            .put(spec("attn_bias", listOf(1, seq, capacity + seq), "float32"))
        val outputs = JSONArray().put(spec("logits", listOf(1, seq, vocab), "float32"))
        for (i in 0 until layers) for (kind in listOf("c_kv", "k_pe")) {
            inputs.put(spec("cache.$i.$kind", listOf(1, capacity, width), "float32"))
            outputs.put(spec("new.$i.$kind", listOf(1, seq, width), "float32"))
        }
        return JSONObject().put("seq", seq).put("inputs", inputs).put("outputs", outputs)
    }
    val file = JSONObject().put("path", "x.onnx")
    val static = JSONObject().put("capacity", capacity).put("chunk", chunk).put("mask_value", -50.0)
        .put("mask_values", JSONObject().put("fp32", -1e4))
        .put("graphs", JSONObject().put("decode", graph(1)).put("prefill", graph(chunk)))
        .put("files", JSONObject().put("fp32", JSONObject().put("decode", file).put("prefill", file)))
    val model = JSONObject().put("num_hidden_layers", layers).put("num_attention_heads", 4)
        .put("qk_nope_head_dim", 8).put("qk_rope_head_dim", 4).put("v_head_dim", 8)
    val json = JSONObject().put("format", "mla-edge-export").put("format_version", ExportManifest.FORMAT_VERSION)
        .put("static", static).put("model", model).put("tokens", JSONObject().put("bos", 0).put("eos", JSONArray()))
    return ExportManifest(File("."), json)
}

/** Writes a fixed row pattern and logits that pick token (position + 1) % vocab; counts binds and runs. */
class FakeRunner : GraphRunner {
    var binds = 0
    var runs = 0
    private val bound = HashMap<String, Pair<List<HostTensor>, List<HostTensor>>>()

    override fun bind(graph: String, inputs: List<HostTensor>, outputs: List<HostTensor>) {
        binds++
        bound[graph] = inputs to outputs
    }

    override fun run(graph: String) {
        runs++
        val (inputs, outputs) = bound.getValue(graph)
        val pos = inputs[1].ints.get(0)
        val logits = outputs[0]
        val vocab = logits.shape[2].toInt()
        for (i in 0 until logits.elements) logits.floats.put(i, if (i % vocab == (pos + 1) % vocab) 1f else 0f)
        for (o in 1 until outputs.size) outputs[o].floats.put(0, pos.toFloat())
    }

    override fun close() {}
}

class EngineMemoryTest {
    private val threads = ManagementFactory.getThreadMXBean() as com.sun.management.ThreadMXBean

    /** Heap bytes allocated per decode step, after warming up, and the engine after the steps. */
    private fun bytesPerStep(capacity: Int, steps: Int = 2000): Pair<Double, StaticEngine> {
        val runner = FakeRunner()
        val engine = StaticEngine(syntheticManifest(capacity), "fp32", runner)
        var token = engine.prefill(intArrayOf(1, 2, 3)).argmax()
        repeat(50) { token = engine.decode(token).argmax() } // warm up (JIT, class loading)
        val before = threads.currentThreadAllocatedBytes
        repeat(steps) { token = engine.decode(token).argmax() }
        val per = (threads.currentThreadAllocatedBytes - before).toDouble() / steps
        assertEquals("graphs bound once each", 2, runner.binds)
        return per to engine
    }

    @Test
    fun aDecodeStepAllocatesNothingThatGrowsWithTheCapacity() {
        val (small, e1) = bytesPerStep(2100)
        val (large, e2) = bytesPerStep(4096 * 4)
        assertEquals(3 + 50 + 2000, e1.length)
        assertEquals(3 + 50 + 2000, e2.length)
        println("heap bytes per decode step: %.1f at capacity 2100, %.1f at capacity 16384".format(small, large))
        // a copy of the buffers per step would allocate >= 2 layers x 2 kinds x capacity x 24 x 4 bytes (800 KB here)
        assertTrue("a decode step allocates $small B at capacity 2100", small < 64)
        assertTrue("a decode step allocates $large B at capacity 16384", large < 64)
    }

    @Test
    fun theMaskIsThePrecisionsOwn() {
        val m = syntheticManifest(8)
        assertEquals(-1e4f, m.maskValue("fp32"), 0f)
        assertEquals(-50f, m.maskValue("w8a16"), 0f) // not listed: the manifest's mask_value
    }

    @Test
    fun newRowsLandAtTheWriteIndexAndNowhereElse() {
        val engine = StaticEngine(syntheticManifest(64), "fp32", FakeRunner())
        engine.prefill(IntArray(11) { it })
        repeat(5) { engine.decode(7) }
        val b = engine.buffers[0]
        val width = b.shape[2].toInt()
        for (slot in 0 until 64) { // FakeRunner writes the call's first position into row 0 col 0 only
            val want = if (slot == 8 || slot in 11 until 16) slot.toFloat() else 0f
            assertEquals("slot $slot", want, b.floats.get(slot * width), 0f)
        }
        assertEquals(16, engine.length)
        assertEquals(2L * 2 * 64 * 24 * 4, engine.cacheBytes)
    }

    @Test
    fun theBiasKeptBetweenCallsEqualsTheReferenceAfterEveryCall() {
        val cap = 40
        val seen = ArrayList<FloatArray>()
        val runner = object : GraphRunner {
            val bound = HashMap<String, List<HostTensor>>()
            override fun bind(graph: String, inputs: List<HostTensor>, outputs: List<HostTensor>) { bound[graph] = inputs }
            override fun run(graph: String) {
                val bias = bound.getValue(graph)[2]
                seen.add(FloatArray(bias.elements) { bias.floats.get(it) })
            }
            override fun close() {}
        }
        val engine = StaticEngine(syntheticManifest(cap, chunk = 8), "w8a16", runner)
        val want = ArrayList<FloatArray>()
        fun expect(length: Int, valid: Int, seq: Int) = want.add(staticBias(length, valid, seq, cap, -50f))
        engine.prefill(IntArray(19) { it }); expect(0, 8, 8); expect(8, 8, 8); expect(16, 3, 8)
        engine.decode(1); expect(19, 1, 1)
        engine.rewind(5); engine.decode(1); expect(5, 1, 1) // a rewind closes the slots it gave back
        engine.prefill(IntArray(4) { it }); expect(6, 4, 8)
        engine.reset(); engine.decode(2); expect(0, 1, 1)
        assertEquals(want.size, seen.size)
        for (i in want.indices) org.junit.Assert.assertArrayEquals("call $i", want[i], seen[i], 0f)
    }
}
