// What a phone loads, and the one line it says when the export's first choice does not fit this app or SoC.
package dev.mlaedge.demo

import org.junit.Assert.assertEquals
import org.junit.Assert.assertThrows
import org.junit.Test
import org.json.JSONObject
import java.io.File
import java.nio.file.Files

class FileChoiceTest {
    private val f = GraphFile("decode.onnx", "decode.ort", "1.32.0", "decode.qnn-sm8650.onnx", "sm8650", "2.51.0")
    private val phone = DeviceRuntime("1.32.0", "2.51.0", "sm8650")

    @Test
    fun matchingFilesAreUsed() {
        assertEquals(FileChoice("decode.ort", false, null), chooseFile(f, Provider.CPU, phone))
        assertEquals(FileChoice("decode.ort", false, null), chooseFile(f, Provider.NNAPI, phone.copy(onnxruntime = "1.33.1")))
        assertEquals(FileChoice("decode.qnn-sm8650.onnx", false, null), chooseFile(f, Provider.QNN, phone))
    }

    @Test
    fun anOrtFileFromANewerOnnxruntimeFallsBackToTheOnnxInOneLine() {
        val c = chooseFile(f, Provider.CPU, phone.copy(onnxruntime = "1.22.0"))
        assertEquals("decode.onnx", c.path)
        assertEquals("not using decode.ort: onnxruntime 1.32.0 wrote it, this app has 1.22.0; loading decode.onnx instead", c.note)
    }

    @Test
    fun aQnnContextForAnotherSocOrSdkIsCompiledOnThePhoneInOneLine() {
        val soc = chooseFile(f, Provider.QNN, phone.copy(soc = "sm8550"))
        assertEquals(FileChoice("decode.onnx", true,
            "not using the QNN context decode.qnn-sm8650.onnx: it was compiled for sm8650, this phone is sm8550; compiling decode.onnx on the phone instead"), soc)
        val sdk = chooseFile(f, Provider.QNN, phone.copy(qnnSdk = "2.40.0"))
        assertEquals("not using the QNN context decode.qnn-sm8650.onnx: it was compiled by QNN SDK 2.51.0, this app has 2.40.0; compiling decode.onnx on the phone instead", sdk.note)
        assertEquals(true, chooseFile(f, Provider.QNN, phone.copy(soc = null)).compiles)
        assertEquals(true, chooseFile(f.copy(qnnContext = null), Provider.QNN, phone).compiles)
    }

    @Test
    fun versionsCompareByNumber() {
        assertEquals(1, compareVersions("1.32.0", "1.9.9"))
        assertEquals(0, compareVersions("1.32", "1.32.0"))
        assertEquals(-1, compareVersions("2.7.0", "2.51.0"))
    }

    @Test
    fun aManifestOfAnotherFormatVersionIsOneLine() {
        val dir = Files.createTempDirectory("manifest").toFile()
        File(dir, ExportManifest.FILE).writeText(JSONObject().put("format", "mla-edge-export").put("format_version", 99).toString())
        val e = assertThrows(IllegalArgumentException::class.java) { ExportManifest.read(dir) }
        assertEquals("${File(dir, ExportManifest.FILE)} has format_version 99; this app reads 2: export again", e.message)
        val missing = assertThrows(IllegalArgumentException::class.java) { ExportManifest.read(File(dir, "nope")) }
        assertEquals("${File(dir, "nope")} is not an mla-edge export folder: mla_edge.json is missing (adb push the export first)", missing.message)
    }
}
