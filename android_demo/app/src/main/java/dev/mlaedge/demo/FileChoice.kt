// Which file of a graph this phone loads, and why: the twin of the Python runtime's checks (Manifest.ort_mismatch,
// the QNN context's SoC in runtime/static.py). An ORT-format file loads only in an onnxruntime at least as new as the
// one that wrote it (the format is backward compatible only); a QNN context binary only on the SoC and QNN SDK it was
// compiled for. Otherwise the phone loads the .onnx (and, for QNN, compiles it once at load), and says so in one line.
package dev.mlaedge.demo

enum class Provider { CPU, XNNPACK, NNAPI, QNN }

/** What the app runs with: onnxruntime's version, the QNN SDK inside onnxruntime-android-qnn, and the phone's SoC
 *  (Build.SOC_MODEL, lower case, e.g. "sm8650"; null when unknown). */
data class DeviceRuntime(val onnxruntime: String, val qnnSdk: String?, val soc: String?)

/** path: the file to load; compiles: QNN builds its graph on the phone; note: one line saying why, when it falls back. */
data class FileChoice(val path: String, val compiles: Boolean, val note: String?)

/** -1, 0, 1 as version a is older, the same, newer than b (numeric dotted parts; a missing part is 0). */
fun compareVersions(a: String, b: String): Int {
    val x = a.split('.', '-', '+').map { it.toIntOrNull() ?: 0 }
    val y = b.split('.', '-', '+').map { it.toIntOrNull() ?: 0 }
    for (i in 0 until maxOf(x.size, y.size)) {
        val c = (x.getOrElse(i) { 0 }).compareTo(y.getOrElse(i) { 0 })
        if (c != 0) return c
    }
    return 0
}

fun chooseFile(f: GraphFile, provider: Provider, device: DeviceRuntime): FileChoice {
    if (provider == Provider.QNN) {
        val ctx = f.qnnContext ?: return FileChoice(f.path, true, "${f.path} has no QNN context: compiling it for the HTP on this phone")
        val why = when {
            device.soc == null -> "this phone's SoC is unknown"
            device.soc.lowercase() != f.qnnSoc?.lowercase() -> "it was compiled for ${f.qnnSoc}, this phone is ${device.soc}"
            f.qnnSdk != null && device.qnnSdk != null && f.qnnSdk != device.qnnSdk ->
                "it was compiled by QNN SDK ${f.qnnSdk}, this app has ${device.qnnSdk}"
            else -> null
        }
        return if (why == null) FileChoice(ctx, false, null)
        else FileChoice(f.path, true, "not using the QNN context $ctx: $why; compiling ${f.path} on the phone instead")
    }
    val ort = f.ortPath ?: return FileChoice(f.path, false, null)
    val writer = f.ortWriter
    return if (writer != null && compareVersions(writer, device.onnxruntime) > 0) {
        FileChoice(f.path, false, "not using $ort: onnxruntime $writer wrote it, this app has ${device.onnxruntime}; loading ${f.path} instead")
    } else {
        FileChoice(ort, false, null)
    }
}
