-- KOA-Serve routing rule for Orthanc: every stored projection radiograph goes to the gateway.
--
-- Only CR, DX and RG images are sent; results (Structured Reports, Secondary Captures), presentation
-- states and documents never are, so the gateway's own results cannot loop back to it. The gateway
-- applies the same rule again (gateway/screen.py).
--
-- Each instance is sent by an asynchronous Orthanc job (POST /modalities/koaserve/store), so storing
-- does not wait for the gateway. A job that fails (the gateway is down) stays in Orthanc's job list
-- as a failure; `python -m pacs start` (make pacs) resubmits those jobs once the gateway listens
-- again (pacs.resubmit_failed_routing), so nothing stored while the gateway was down is forgotten.

local GATEWAY = 'koaserve'          -- the DicomModalities entry of the gateway (pacs/orthanc.json)
local MODALITIES = { CR = true, DX = true, RG = true }
local NEVER = {
  '1.2.840.10008.5.1.4.1.1.88.',    -- Structured Reports (and key objects)
  '1.2.840.10008.5.1.4.1.1.7',      -- Secondary Capture, single and multi-frame
  '1.2.840.10008.5.1.4.1.1.11.',    -- presentation states
  '1.2.840.10008.5.1.4.1.1.104.',   -- encapsulated documents
}

local function is_radiograph(tags)
  local sop_class = tags['SOPClassUID'] or ''
  for _, prefix in ipairs(NEVER) do
    if string.sub(sop_class, 1, string.len(prefix)) == prefix then
      return false
    end
  end
  return MODALITIES[string.upper(tags['Modality'] or '')] == true
end

function OnStoredInstance(instanceId, tags, metadata, origin)
  if is_radiograph(tags) then
    local body = DumpJson({ Resources = { instanceId }, Asynchronous = true, Priority = 0 })
    RestApiPost('/modalities/' .. GATEWAY .. '/store', body)
  end
end

function OnJobFailure(jobId)
  local job = ParseJson(RestApiGet('/jobs/' .. jobId))
  if job['Type'] == 'DicomModalityStore' and job['Content']['RemoteAet'] == 'KOASERVE' then
    print('routing job ' .. jobId .. ' to the KOA-Serve gateway failed (is it running?); ' ..
          'python -m pacs start resubmits it')
  end
end
